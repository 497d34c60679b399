"""Prompt accuracy on the shapes domain: evaluation prompts, and the judge's verdicts summed up.

Drawing the images is `report.draw`; `report.evaluate` puts the two together.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from ..shapes import Scene, ShapesDataset, caption, eval_scenes
from . import strict

KINDS = ("seen", "held_out", "two", "three")
ATTRIBUTES = ("correct", "colour", "shape", "position", "extra")
INTERVAL_KEYS = ("correct", "strict_correct")  # the fractions a report gives a 95 % interval for
Z95 = NormalDist().inv_cdf(0.975)  # 1.96: a two-sided 95 % interval


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
        for one-object prompts "strict_by_pair" (`strict.by_pair`: which pairs and sizes fail), and
        "verdicts": per image, a string of "1" (right) and "0" for "correct" and "strict_correct".
    """
    verdicts = [strict.strict_judge(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    scores = {key: float(np.mean([getattr(v.judge, key) for v in verdicts])) for key in ATTRIBUTES}
    pairs = strict.by_pair(verdicts, prompts)
    # image by image, "1" right and "0" wrong, for paired comparisons of two reports (`compare`)
    marks = {"correct": "".join("01"[v.judge.correct] for v in verdicts),
             "strict_correct": "".join("01"[v.correct] for v in verdicts)}
    return {**scores, **strict.summary(verdicts), **({"strict_by_pair": pairs} if pairs else {}), "verdicts": marks}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a fraction `successes / n` (95 % for the default z).

    Unlike the plain "p +- z * sqrt(p(1 - p) / n)", it stays inside [0, 1] and is not empty at 0 or n:
    100 % of 200 images still only says the true rate is above 98.1 %.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"`successes`: got {successes!r} of n = {n!r}; expected 0 <= successes <= n and n >= 1")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exactly 0 and 1 at the ends, where rounding would leave 1e-17 and 0.9999999999999999
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def intervals(scores: dict) -> dict[str, list[float]]:
    """95 % Wilson intervals of a set's `INTERVAL_KEYS` fractions (those it has), from its "n" images."""
    return {key: list(wilson_interval(round(scores[key] * scores["n"]), scores["n"]))
            for key in INTERVAL_KEYS if key in scores}
