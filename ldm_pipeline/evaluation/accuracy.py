"""Prompt accuracy on the shapes domain: evaluation prompts, and the judge's verdicts summed up.

Drawing the images is `report.draw`; `report.evaluate` puts the two together.
"""

from __future__ import annotations

import numpy as np

from ..training.shapes import Scene, ShapesDataset, caption, eval_scenes
from . import strict

KINDS = ("seen", "held_out", "two", "three")
ATTRIBUTES = ("correct", "colour", "shape", "position", "extra")


def training_captions(count: int, seed: int = 0) -> set[str]:
    """The captions of the first `count` training items (what a UNet trained on a cache of that size saw)."""
    dataset = ShapesDataset(count, seed=seed)
    return {caption(dataset.scene(i)) for i in range(count)}


def scenes_for(kind: str, n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[Scene]:
    """`n` evaluation scenes of a kind, leaving out those whose caption is in `exclude` (where any are left)."""
    pool = eval_scenes(kind, 20 * n, seed)
    fresh = [scene for scene in pool if caption(scene) not in exclude]
    return (fresh if len(fresh) >= n else pool)[:n]


def judge_images(images: list, prompts: list[str]) -> dict:
    """The judge's verdicts summed up over a set of images.

    Returns:
        The fraction of images with every object right and nothing extra ("correct") and per
        attribute ("colour", "shape", "position"), "extra", the mean count of objects not
        asked for, the strict measure's "strict_correct" and "strict_shape" (see `strict`), and
        for one-object prompts "strict_by_pair" (`strict.by_pair`: which pairs and sizes fail).
    """
    verdicts = [strict.strict_judge(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    scores = {key: float(np.mean([getattr(v.judge, key) for v in verdicts])) for key in ATTRIBUTES}
    pairs = strict.by_pair(verdicts, prompts)
    return {**scores, **strict.summary(verdicts), **({"strict_by_pair": pairs} if pairs else {})}
