"""The shapes scenes drawn: antialiased images, the torch data set and captioned image folders."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .scenes import (BACKGROUND, COLOURS, EXTRA_SHAPES, IMAGE_SIZE, SHAPES, STAR_INNER, SUPERSAMPLE, Scene,
                     ShapeObject, allowed_pairs, caption, object_chances, partial_caption, sample_scene)


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    x, y = (v * side for v in obj.centre)
    h = obj.half_size * side
    fill = COLOURS[obj.colour]
    # PIL boxes are inclusive pixel indices: pulling each edge in by half a pixel makes the drawn area
    # and centre match the continuous shape (checked by counting pixels).
    box = [x - h + 0.5, y - h + 0.5, x + h - 0.5, y + h - 0.5]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        # PIL fills every pixel the outline touches; shrinking the triangle towards its incentre by
        # 0.4 canvas pixels makes the drawn area 2*h*h like the continuous one.
        inradius = 2 * h / (1 + 5 ** 0.5)
        incentre_y = y + h - inradius
        k = 1 - 0.4 / inradius
        corners = [(x, y - h), (x - h, y + h), (x + h, y + h)]
        draw.polygon([(x + (px - x) * k, incentre_y + (py - incentre_y) * k) for px, py in corners], fill=fill)
    elif obj.shape == "star":
        draw.polygon(star_corners(x, y, h), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES + EXTRA_SHAPES}")


def star_corners(x: float, y: float, radius: float) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star centred at (x, y), one point straight up."""
    corners = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * STAR_INNER
        angle = np.pi * (-0.5 + i / 5)
        corners.append((x + r * np.cos(angle), y + r * np.sin(angle)))
    return corners


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene, antialiased, on the grey background.

    Args:
        scene: what to draw.
        image_size: the side of the square image in pixels.

    Returns:
        An RGB PIL image of `image_size` x `image_size`.
    """
    side = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, side)
    return canvas.resize((image_size, image_size), Image.BOX)


class ShapesDataset(torch.utils.data.Dataset):
    """`length` random scenes; item i is drawn from `numpy.random.default_rng([seed, i])` alone.

    Items are rendered on demand, so any item can be drawn without the others and the set costs no
    memory. Each item is `{"image": PIL RGB image, "text": caption}`. With `partial_captions` > 0 some
    object phrases name only the colour or only the shape (`partial_caption`), decided by a stream of
    the item's own (`[seed, i, 1]`), so the scenes are the same as without.
    """

    def __init__(self, length: int, seed: int = 0, split: str = "train", two_objects_prob: float = 0.5,
                 three_objects_prob: float = 0.0, partial_captions: float = 0.0):
        if length < 0:
            raise ValueError(f"`length`: got {length}; expected >= 0")
        if not (isinstance(partial_captions, (int, float)) and 0 <= partial_captions <= 1):
            raise ValueError(f"`partial_captions`: got {partial_captions!r}; expected a chance from 0 to 1")
        allowed_pairs(split)  # fail now, not at the first item
        sample_scene(np.random.default_rng(0), split, two_objects_prob, three_objects_prob)  # checks the chances
        self.length, self.seed, self.split = length, seed, split
        self.two_objects_prob, self.three_objects_prob = two_objects_prob, three_objects_prob
        self.partial_captions = float(partial_captions)

    @classmethod
    def with_max_objects(cls, length: int, seed: int = 0, max_objects: int = 2, partial_captions: float = 0.0,
                         three_objects_prob: float | None = None, split: str = "train") -> ShapesDataset:
        """The training split (or `split` "any", every pair) with up to `max_objects` objects a scene
        (see `object_chances`)."""
        if split not in ("train", "any"):
            raise ValueError(f"`split`: got {split!r}; expected 'train' or 'any' (training data of several objects)")
        return cls(length, seed, split, *object_chances(max_objects, three_objects_prob),
                   partial_captions=partial_captions)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene behind item `index` (negative indices count from the end)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index %= self.length
        return sample_scene(np.random.default_rng([self.seed, index]), self.split, self.two_objects_prob,
                            self.three_objects_prob)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        if self.partial_captions:
            text = partial_caption(scene, np.random.default_rng([self.seed, index % self.length, 1]),
                                   self.partial_captions)
        else:
            text = caption(scene)
        return {"image": render(scene), "text": text}


# The training data's chances of (two, three) objects by the most objects a scene may hold (a recipe's
# "max_objects"); 2 is the bundled model's data, unchanged since before three-object scenes existed.
def write_image_folder(scenes: list[Scene], folder) -> int:
    """Render scenes into `folder` as PNGs with a `metadata.jsonl` of captions (what `--data` reads).

    The folder must be new (or empty): nothing of the user's is overwritten. It is written under a
    temporary name beside it and renamed when whole, so a folder with that name is always complete.
    """
    import json
    from pathlib import Path

    from ..files import atomic_folder

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"`out`: {str(folder)!r} exists and is not an empty folder; choose a new one")
    with atomic_folder(folder) as temporary:
        lines = []
        for i, scene in enumerate(scenes):
            name = f"{i:05d}.png"
            render(scene).save(temporary / name)
            lines.append(json.dumps({"file_name": name, "text": caption(scene)}))
        (temporary / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return len(scenes)
