"""A rule-based judge: does an image show what its shapes prompt asks for?

`find_objects` reads the objects in an image of the shapes data set (`ldm_pipeline.training.shapes`):
every pixel takes its nearest palette colour, each colour's connected regions are objects, and an
object's colour, shape, position and size come from simple measurements of its region. `judge`
compares what it finds with what a prompt asks for. On the data set's own renders it is right for
essentially every scene (see tests/test_judge.py), so its verdicts on generated images measure the
model, not the judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm_pipeline.training.shapes import BACKGROUND, COLOURS, POSITIONS, SIZES, parse_caption

# A pixel further than this (RGB distance) from every palette colour belongs to no object: it is an
# antialiased edge or a colour the palette does not have. 60 is below half the distance from the
# background to every colour but purple (86), so half-covered edge pixels never take a wrong colour.
MAX_COLOUR_DISTANCE = 60.0
# Regions smaller than this (in pixels at 64x64, scaled with the image area) are specks, not objects;
# the smallest object the data set draws (a small triangle) covers about 52 pixels.
MIN_AREA_64 = 12
# Shape rules on the region's bounding box. Fill ratio (area / box area): square ~1, circle ~0.785,
# triangle ~0.5; taper (mean row width of the top third / of the bottom third): triangle ~0.2, else ~1.
SQUARE_MIN_FILL = 0.91
CIRCLE_MIN_FILL = 0.65
TRIANGLE_MAX_FILL = 0.65
TRIANGLE_MAX_TAPER = 0.5
MAX_ASPECT = 1.4  # every shape's box is square; a longer box is no shape of ours
# Size words from the estimated half-size (fraction of the side), half-way between the ranges.
SMALL_BELOW = (SIZES["small"][1] + SIZES["default"][0]) / 2    # 0.115
LARGE_ABOVE = (SIZES["default"][1] + SIZES["large"][0]) / 2    # 0.165
# Area of each shape in units of its half-size squared.
AREA_PER_H2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0}

_NAMES = list(COLOURS)
_PALETTE = np.array([BACKGROUND] + [COLOURS[n] for n in _NAMES], dtype=np.float32)
_BG = np.array(BACKGROUND, dtype=np.float32)


@dataclass
class Found:
    """An object seen in an image. `centroid` is (x, y) as fractions of the width and height."""

    colour: str
    shape: str          # "circle", "square", "triangle" or "unknown"
    position: str
    size: str
    area: int           # pixels of the region
    centroid: tuple[float, float]


@dataclass
class Verdict:
    """How an image compares with its prompt.

    `correct`: every asked-for object is there with the right colour, shape and position, and nothing
    else is. `colour`, `shape`, `position`, `size`: that attribute is right for every asked-for object
    (false when one is missing). `extra`: objects found but not asked for; `missing`: asked for, not found.
    """

    correct: bool
    colour: bool
    shape: bool
    position: bool
    extra: int
    missing: int
    found: list[Found] = field(default_factory=list)
    size: bool = False


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"`image`: expected a PIL image or an HxWx3 array, got shape {array.shape}")
    return array.astype(np.float32)


def _shape(region: np.ndarray) -> str:
    """Classify a region cropped to its bounding box."""
    rows = region.sum(axis=1)
    height, width = region.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        return "unknown"
    fill = region.sum() / region.size
    third = max(1, height // 3)
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1e-6)
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill < TRIANGLE_MAX_FILL and taper < TRIANGLE_MAX_TAPER:
        return "triangle"
    if fill >= CIRCLE_MIN_FILL and taper >= TRIANGLE_MAX_TAPER:
        return "circle"
    return "unknown"


def _coverage(pixels: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """How much of each pixel the colour covers, reading each pixel as a background/colour blend."""
    direction = colour - _BG
    return np.clip((pixels - _BG) @ direction / (direction @ direction), 0.0, 1.0)


def _size_word(half_size: float) -> str:
    if half_size < SMALL_BELOW:
        return "small"
    return "large" if half_size > LARGE_ABOVE else "default"


def find_objects(image) -> list[Found]:
    """Find the objects in a shapes image.

    Args:
        image: a PIL image or an HxWx3 uint8 array, of any size (measurements scale with the side).

    Returns:
        The objects found, sorted by colour then position, each with its colour, shape, position,
        size word, pixel area and centroid.
    """
    pixels = _as_array(image)
    height, width = pixels.shape[:2]
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)
    nearest = distance.argmin(axis=-1)
    # Index 0 is the background; pixels far from every colour stay unassigned (-1).
    label = np.where(distance.min(axis=-1) <= MAX_COLOUR_DISTANCE, nearest - 1, -1)
    assigned = label >= 0
    min_area = MIN_AREA_64 * height * width / 64 ** 2
    side = (height * width) ** 0.5
    anchors = np.array(list(POSITIONS.values()))
    found = []
    for index, name in enumerate(_NAMES):
        regions, count = ndimage.label(label == index)
        for number, box in enumerate(ndimage.find_objects(regions), start=1):
            region = regions[box] == number
            area = int(region.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(region)
            centroid = ((xs.mean() + box[1].start + 0.5) / width, (ys.mean() + box[0].start + 0.5) / height)
            position = list(POSITIONS)[int(np.linalg.norm(anchors - centroid, axis=1).argmin())]
            shape = _shape(region)
            # Hard pixel counts shrink an object by a colour-dependent amount (white needs ~73% cover
            # to be nearer white than grey, purple ~50%), enough to cross a size boundary; summing
            # the coverage of the region and its unassigned rim measures the true area instead.
            whole = regions == number
            rim = ndimage.binary_dilation(whole, structure=np.ones((3, 3), bool), iterations=2) & ~assigned
            soft_area = _coverage(pixels[whole | rim], _PALETTE[index + 1]).sum()
            if shape in AREA_PER_H2:
                half_size = (soft_area / AREA_PER_H2[shape]) ** 0.5 / side
            else:
                half_size = (region.shape[0] + region.shape[1]) / 4 / side
            found.append(Found(name, shape, position, _size_word(half_size), area,
                               (float(centroid[0]), float(centroid[1]))))
    return found


# Greedy matching, most specific first: an exact match is never broken up to fix a weaker one.
_MATCH_KEYS = (("colour", "shape", "position"), ("colour", "position"), ("colour", "shape"),
               ("shape", "position"), ("colour",), ("position",), ("shape",), ())


def _match(expected: list, found: list) -> list[tuple[int, int]]:
    pairs, free_e, free_f = [], list(range(len(expected))), list(range(len(found)))
    for keys in _MATCH_KEYS:
        for e in list(free_e):
            for f in free_f:
                if all(getattr(expected[e], k) == getattr(found[f], k) for k in keys):
                    pairs.append((e, f))
                    free_e.remove(e)
                    free_f.remove(f)
                    break
    return pairs


def judge(image, prompt: str) -> Verdict:
    """Compare an image with its shapes prompt.

    Args:
        image: a PIL image or an HxWx3 uint8 array.
        prompt: a caption in the data set's grammar (see `ldm_pipeline.training.shapes.caption`).

    Returns:
        A `Verdict`; its `found` lists everything seen.

    Raises:
        ValueError: if `prompt` is not a shapes caption.
    """
    expected = parse_caption(prompt)
    found = find_objects(image)
    pairs = _match(expected, found)
    missing = len(expected) - len(pairs)
    extra = len(found) - len(pairs)

    def right(attribute: str) -> bool:
        return missing == 0 and all(getattr(expected[e], attribute) == getattr(found[f], attribute) for e, f in pairs)

    colour, shape, position = right("colour"), right("shape"), right("position")
    return Verdict(colour and shape and position and extra == 0, colour, shape, position, extra, missing,
                   found, right("size"))
