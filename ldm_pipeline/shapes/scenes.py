"""The procedural "shapes" data set: coloured circles, squares and triangles on grey, with captions.

A scene holds one object ("a red circle in the top left") or two objects in two different corners
("a red circle in the top left and a large blue square in the bottom right"); with
`three_objects_prob` (a recipe's `"max_objects": 3`), also three in three different corners. Images are 64x64 RGB,
drawn on a 4x supersampled canvas and box-filtered down, so edges are antialiased and every pixel
is a deterministic function of the scene. Three colour/shape pairs (`HELD_OUT_PAIRS`) never occur in
the training split, so a model trained on it can be asked for combinations it has never seen.

Scenes and their captions live here (a caption must name exactly what is drawn); `dataset` draws
them, as images, a torch data set and image folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
BACKGROUND = (128, 128, 128)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shapes the renderer, captions and judge know but the bundled model's data never draws: new
# concepts for fine-tuning (a LoRA teaches "star"; see configs/lora.json).
EXTRA_SHAPES = ("star",)
STAR_INNER = 0.5  # a star's inner radius as a fraction of its outer one (a regular pentagram: 0.38)
# Object centres as fractions of the side, (x, y) with y pointing down.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73), "center": (0.5, 0.5),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
# Half-size ranges as fractions of the side; the gaps between them keep the size words decidable.
SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "default": (0.12, 0.16), "large": (0.17, 0.20)}
SIZE_PROBS = {"small": 0.25, "default": 0.5, "large": 0.25}
HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "circle"), ("white", "square")})
JITTER = 0.03
MIN_GAP_PIXELS = 2  # at IMAGE_SIZE; the gap scales with the image
SUPERSAMPLE = 4
SPLITS = ("train", "held_out", "any")


@dataclass(frozen=True)
class ShapeObject:
    """One object: its words (colour, shape, position, size) and the exact geometry drawn.

    `jitter` is the (x, y) offset of the centre from its anchor and `half_size` half the side of the
    bounding box, both as fractions of the image side.
    """

    colour: str
    shape: str
    position: str
    size: str = "default"
    jitter: tuple[float, float] = (0.0, 0.0)
    half_size: float = 0.14

    @property
    def centre(self) -> tuple[float, float]:
        ax, ay = POSITIONS[self.position]
        return ax + self.jitter[0], ay + self.jitter[1]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) as fractions of the side."""
        x, y = self.centre
        return x - self.half_size, y - self.half_size, x + self.half_size, y + self.half_size


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject) -> str:
    words = ([obj.size] if obj.size != "default" else []) + [obj.colour, obj.shape]
    return f"{_article(words[0])} {' '.join(words)} in the {obj.position}"


def caption(scene: Scene, joiner: str = " and ") -> str:
    """The caption of a scene: one phrase per object, joined by `joiner`.

    Args:
        scene: the scene to describe.

    Returns:
        e.g. "an orange circle in the top left and a large blue square in the bottom right".
    """
    return joiner.join(_phrase(obj) for obj in scene.objects)


def composed_caption(scene: Scene) -> str:
    """The caption as a composed prompt: one part per object, joined by " AND " (see `guidance.composition`)."""
    return caption(scene, " AND ")


# Each position word's box (left, top, right, bottom, fractions of the side): the quadrant of a corner,
# the middle of the picture for the center; every object of the data lies inside its position's box.
POSITION_BOXES = {"top left": (0.0, 0.0, 0.5, 0.5), "top right": (0.5, 0.0, 1.0, 0.5),
                  "bottom left": (0.0, 0.5, 0.5, 1.0), "bottom right": (0.5, 0.5, 1.0, 1.0),
                  "center": (0.25, 0.25, 0.75, 0.75)}


def scene_regions(scene: Scene) -> list[tuple[float, float, float, float]]:
    """The box of each object's position, in the order of `composed_caption`'s parts (`regions=`)."""
    return [POSITION_BOXES[obj.position] for obj in scene.objects]


PARTIAL_NOUN = "shape"  # the noun of a phrase that names the colour only ("a red shape in the top left")


def partial_caption(scene: Scene, rng: np.random.Generator, chance: float) -> str:
    """A caption in which each object's phrase, at `chance`, names only its colour ("a red shape in
    the top left") or only its shape ("a large circle in the top left"), half and half.

    Training on some such captions teaches the colour and shape words separately, so that a pair never
    seen together (a held-out pair) is drawn from each word's own meaning.
    """
    phrases = []
    for obj in scene.objects:
        words = [obj.colour, obj.shape]
        if rng.random() < chance:
            words = [obj.colour, PARTIAL_NOUN] if rng.random() < 0.5 else [obj.shape]
        words = ([obj.size] if obj.size != "default" else []) + words
        phrases.append(f"{_article(words[0])} {' '.join(words)} in the {obj.position}")
    return " and ".join(phrases)


def unplaced_caption(scene: Scene) -> str:
    """A caption that names only each object's colour and shape: no position, no size ("an orange circle and
    a blue square"). An edge ControlNet trains on some such captions, so that its outline alone decides
    where an object goes and how large it is."""
    return " and ".join(f"{_article(obj.colour)} {obj.colour} {obj.shape}" for obj in scene.objects)


_PHRASE = re.compile(
    r"(?P<article>an?) (?:(?P<size>small|large) )?(?P<colour>{}) (?P<shape>{}) in the (?P<position>{})".format(
        "|".join(COLOURS), "|".join(SHAPES + EXTRA_SHAPES), "|".join(POSITIONS)))


def parse_caption(text: str) -> list[ShapeObject]:
    """Read the objects back from a caption written by `caption` (case and spacing are forgiven).

    Args:
        text: a shapes caption.

    Returns:
        One `ShapeObject` per phrase with its colour, shape, position and size; there is no jitter, and
        `half_size` is the middle of the size word's range (0.14, the dataclass default, for "default").

    Raises:
        ValueError: naming `text`, if it is not a shapes caption (wrong words or wrong article).
    """
    normal = " ".join(str(text).lower().split()).rstrip(".")
    objects = []
    for part in normal.split(" and "):
        match = _PHRASE.fullmatch(part)
        if match is None:
            raise ValueError(f"not a shapes caption: {text!r} (cannot read {part!r})")
        size = match["size"] or "default"
        first = match["size"] or match["colour"]
        if match["article"] != _article(first):
            raise ValueError(f"not a shapes caption: {text!r} (expected {_article(first)!r} before {first!r})")
        low, high = SIZES[size]
        objects.append(ShapeObject(match["colour"], match["shape"], match["position"], size,
                                   half_size=round((low + high) / 2, 6)))
    return objects


def _apart(objects: list[ShapeObject]) -> bool:
    gap = MIN_GAP_PIXELS / IMAGE_SIZE
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            (al, at, ar, ab), (bl, bt, br, bb) = a.bbox, b.bbox
            if max(bl - ar, al - br, bt - ab, at - bb) < gap:
                return False
    return True


def allowed_pairs(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"`split`: got {split!r}; expected one of {SPLITS}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return [p for p in pairs if p not in HELD_OUT_PAIRS]
    if split == "held_out":
        return [p for p in pairs if p in HELD_OUT_PAIRS]
    return pairs


def sample_scene(rng: np.random.Generator, split: str = "train", two_objects_prob: float = 0.5,
                 three_objects_prob: float = 0.0) -> Scene:
    """Draw a random scene.

    Args:
        rng: the only source of randomness, so equal generator states give equal scenes.
        split: "train" (no held-out pair), "held_out" (a single object whose pair is held out; ignores
            the object probabilities) or "any" (no restriction).
        two_objects_prob: chance of two objects, in two different corners, instead of one anywhere.
        three_objects_prob: chance of three objects, in three different corners. At 0 (the default)
            the generator is used exactly as before three-object scenes existed, so every scene of
            the bundled model's data is drawn unchanged.

    Returns:
        A `Scene` whose objects are at least `MIN_GAP_PIXELS` apart.
    """
    pairs = allowed_pairs(split)
    if not (0 <= two_objects_prob and 0 <= three_objects_prob and two_objects_prob + three_objects_prob <= 1):
        raise ValueError(f"`two_objects_prob`, `three_objects_prob`: got {two_objects_prob}, {three_objects_prob}; "
                         "expected chances >= 0 that add up to at most 1")
    count = 1
    if split != "held_out":
        draw = rng.random()
        count = 3 if draw < three_objects_prob else 2 if draw < three_objects_prob + two_objects_prob else 1
    if count == 1:
        places = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
    else:
        places = [CORNERS[i] for i in rng.choice(len(CORNERS), size=count, replace=False)]
    words = []
    for place in places:
        colour, shape = pairs[rng.integers(len(pairs))]
        size = list(SIZE_PROBS)[rng.choice(len(SIZE_PROBS), p=list(SIZE_PROBS.values()))]
        words.append((colour, shape, place, size))
    # Only the geometry is redrawn, so the caption distribution is not skewed by the spacing rule;
    # even two large objects side by side fit when their jitter is small (and so three in three
    # corners, which are two pairs of neighbours).
    while True:
        objects = [ShapeObject(colour, shape, place, size,
                               jitter=(float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER))),
                               half_size=float(rng.uniform(*SIZES[size])))
                   for colour, shape, place, size in words]
        if _apart(objects):
            return Scene(tuple(objects))


OBJECT_CHANCES = {1: (0.0, 0.0), 2: (0.5, 0.0), 3: (1 / 3, 1 / 3)}


def object_chances(max_objects: int, three_objects_prob: float | None = None) -> tuple[float, float]:
    """(two_objects_prob, three_objects_prob) for scenes of up to `max_objects` objects; with
    `three_objects_prob` (max_objects 3 only), that share of three-object scenes and the rest split
    evenly between one and two objects."""
    if max_objects not in OBJECT_CHANCES:
        raise ValueError(f"`max_objects`: got {max_objects!r}; expected one of {tuple(OBJECT_CHANCES)}")
    if three_objects_prob is None:
        return OBJECT_CHANCES[max_objects]
    if max_objects != 3 or not (isinstance(three_objects_prob, (int, float)) and 0 <= three_objects_prob <= 1):
        raise ValueError(f"`three_objects_prob`: got {three_objects_prob!r} with `max_objects` {max_objects!r}; "
                         "expected a chance from 0 to 1 with max_objects 3")
    return (1 - three_objects_prob) / 2, float(three_objects_prob)


# kind: (split, two_objects_prob, three_objects_prob); a new kind goes at the end (its index seeds its stream)
EVAL_KINDS = {"seen": ("train", 0.0, 0.0), "held_out": ("held_out", 0.0, 0.0), "two": ("train", 1.0, 0.0),
              "three": ("train", 0.0, 1.0)}


def eval_scenes(kind: str, n: int, seed: int) -> list[Scene]:
    """Scenes to test a model on, the same for the same arguments.

    Args:
        kind: "seen" (one object, a training pair), "held_out" (one object, a held-out pair),
            "two" (two objects, training pairs) or "three" (three objects, training pairs).
        n: how many scenes (captions can repeat: there are only 45 held-out captions).
        seed: selects the list.

    Returns:
        `n` scenes; their captions are the prompts and their renders the real images.
    """
    if kind not in EVAL_KINDS:
        raise ValueError(f"`kind`: got {kind!r}; expected one of {tuple(EVAL_KINDS)}")
    split, two, three = EVAL_KINDS[kind]
    # A stream of its own per kind, distinct from the training items' [seed, i] streams.
    rng = np.random.default_rng([seed, 1 << 40, list(EVAL_KINDS).index(kind)])
    return [sample_scene(rng, split, two, three) for _ in range(n)]


def eval_prompts(kind: str, n: int, seed: int) -> list[str]:
    """The captions of `eval_scenes(kind, n, seed)`."""
    return [caption(scene) for scene in eval_scenes(kind, n, seed)]


def new_shape_scenes(shape: str, n: int, seed: int = 0, two_objects_prob: float = 0.3) -> list[Scene]:
    """Scenes that teach a shape: one object of that shape in any colour, sometimes beside a training-split
    object in another corner; the same for the same arguments. A shape of `EXTRA_SHAPES` is new to the
    bundled model; one of `SHAPES` is a shape it draws, for a new word for it (textual inversion)."""
    known = (*EXTRA_SHAPES, *SHAPES)
    if shape not in known:
        raise ValueError(f"`shape`: got {shape!r}; expected one of {known}")
    rng = np.random.default_rng([seed, 1 << 41, known.index(shape)])
    scenes = []
    for _ in range(n):
        scene = sample_scene(rng, "train", two_objects_prob)
        first = scene.objects[0]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        objects = (ShapeObject(colour, shape, first.position, first.size, first.jitter, first.half_size),
                   *scene.objects[1:])
        scenes.append(Scene(objects))
    return scenes
