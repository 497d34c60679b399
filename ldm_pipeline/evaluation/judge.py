"""A rule-based judge: does an image show what its shapes prompt asks for?

`find_objects` reads the objects in an image of the shapes data set (`ldm_pipeline.shapes`):
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

from ..shapes import BACKGROUND, COLOURS, POSITIONS, SIZES, STAR_INNER, parse_caption, star_corners

# A pixel further than this (RGB distance) from every palette colour belongs to no object: it is an
# antialiased edge or a colour the palette does not have. 60 is below half the distance from the
# background to every colour but purple (86), so half-covered edge pixels never take a wrong colour.
MAX_COLOUR_DISTANCE = 60.0
# Regions smaller than this (in pixels at 64x64, scaled with the image area) are specks, not objects;
# the smallest object the data set draws (a small triangle) covers about 52 pixels.
MIN_AREA_64 = 12
# Shapes are read by template matching: the region's soft coverage is compared with an ideal circle,
# square and triangle of the same area and centre, and the closest wins. Unlike rules on the hard
# mask, this survives the softened corners and edges of decoded images. A best fit that still
# misses more than this fraction of the area is no shape of ours.
MAX_TEMPLATE_ERROR = 0.5
MAX_ASPECT = 1.4  # every shape's box is square; a longer box is no shape of ours
SUBSAMPLES = 4  # template coverage is averaged over 4x4 points per pixel
# Size words from the estimated half-size (fraction of the side), half-way between the ranges.
SMALL_BELOW = (SIZES["small"][1] + SIZES["default"][0]) / 2    # 0.115
LARGE_ABOVE = (SIZES["default"][1] + SIZES["large"][0]) / 2    # 0.165
# Area of each shape in units of its half-size squared.
AREA_PER_H2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "star": 5 * STAR_INNER * np.sin(np.pi / 5)}

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
    # HxW coverage (0..1) of each pixel by this object: its region and antialiased rim (read by `strict`)
    cover: np.ndarray | None = field(default=None, repr=False, compare=False)


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
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (asked-for index, found index) matched


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"`image`: expected a PIL image or an HxWx3 array, got shape {array.shape}")
    return array.astype(np.float32)


def _template(shape: str, cx: float, cy: float, h: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Coverage (0..1) of each pixel (ys, xs: pixel indices) by an ideal shape of half-size h at (cx, cy)."""
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    y = ys[:, None, None] + offsets[None, :, None]
    x = xs[:, None, None] + offsets[None, None, :]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":  # pointing up: apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
        inside = (y <= cy + h) & (y >= cy - h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
    else:  # star: five points, one straight up, centred at (cx, cy)
        from matplotlib.path import Path as Polygon

        points = np.stack(np.broadcast_arrays(x, y), axis=-1).reshape(-1, 2)
        inside = Polygon(star_corners(cx, cy, h)).contains_points(points).reshape(np.broadcast(x, y).shape)
    return inside.mean(axis=(1, 2))


def _shape(ys: np.ndarray, xs: np.ndarray, cover: np.ndarray, box_h: int, box_w: int) -> tuple[str, float]:
    """The best-fitting shape for pixels (ys, xs) with coverages `cover`; returns (shape, half-size in px)."""
    if max(box_h, box_w) > MAX_ASPECT * min(box_h, box_w):
        return "unknown", (box_h + box_w) / 4
    area = cover.sum()
    cx = ((xs + 0.5) * cover).sum() / area
    cy = ((ys + 0.5) * cover).sum() / area
    best, best_error, best_h = "unknown", np.inf, (box_h + box_w) / 4
    for shape, per_h2 in AREA_PER_H2.items():
        h = (area / per_h2) ** 0.5
        # a triangle's centroid lies a third of its half-height below the centre of its box
        centre_y = cy - h / 3 if shape == "triangle" else cy
        error = np.abs(_template(shape, cx, centre_y, h, ys, xs) - cover).sum() / area
        if error < best_error:
            best, best_error, best_h = shape, error, h
    return (best if best_error <= MAX_TEMPLATE_ERROR else "unknown"), best_h


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
            # Hard pixel counts shrink an object by a colour-dependent amount (white needs ~73% cover
            # to be nearer white than grey, purple ~50%); the coverage of the region and its
            # unassigned rim measures the true extent, for the shape and the size alike.
            whole = regions == number
            rim = ndimage.binary_dilation(whole, structure=np.ones((3, 3), bool), iterations=2) & ~assigned
            ys, xs = np.nonzero(whole | rim)
            cover = _coverage(pixels[ys, xs], _PALETTE[index + 1])
            shape, half_size_px = _shape(ys, xs, cover, region.shape[0], region.shape[1])
            half_size = half_size_px / side
            mask = np.zeros((height, width), np.float32)
            mask[ys, xs] = cover
            found.append(Found(name, shape, position, _size_word(half_size), area,
                               (float(centroid[0]), float(centroid[1])), mask))
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
        prompt: a caption in the data set's grammar (see `ldm_pipeline.shapes.caption`).

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
                   found, right("size"), pairs)
