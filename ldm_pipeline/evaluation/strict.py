"""A strict shape measure: how well each object's mask fits the ideal mask of the shape asked for.

The judge (`judge.py`) names the shape whose template is closest to an object; a rounded square is
closer to a square than to a circle, so it passes as a square. This measure asks more. For every
object the judge found and matched to the prompt, it fits each ideal shape (circle, square, triangle
pointing up: the renderer neither rotates nor stretches them) to the object's soft coverage mask at
the best centre and scale, and scores the fit by soft IoU (the sum of the smaller of the two
coverages over the sum of the larger). The asked shape passes only if its IoU is high
(`MIN_IOU`) *and* beats every other shape's by a clear margin (`MARGIN`). The thresholds are set
on the renderer's own images (all pass) and on shapes blended between ours (rounded squares,
squircles, squares with domed tops, triangles with rounded corners: all fail); see
tests/test_strict.py and the README's "A strict shape measure".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..shapes import SHAPES, parse_caption
from .judge import AREA_PER_H2, Verdict, _template, judge

# Calibrated on renders and blends (tests/test_strict.py): a render fits its own shape at IoU >= 0.98,
# at least 0.15 above the next shape (a perfect square fits a circle at ~0.85, so no margin exceeds
# ~0.15). Squares with corners rounded by 0.4 of the half-size or more, squircles, squares with a
# domed top and triangles with rounded corners fit their nearest shape with a margin below 0.10
# or an IoU below 0.90, and fail.
MIN_IOU = 0.90
MARGIN = 0.10


@dataclass
class ShapeFit:
    """How one object's mask fits each ideal shape: `iou` by shape, and the best centre and half-size
    (pixels) of the asked shape's fit."""

    asked: str
    iou: dict[str, float]
    centre: tuple[float, float]
    half_size: float

    @property
    def margin(self) -> float:
        """The asked shape's IoU minus the best other shape's."""
        return self.iou[self.asked] - max(v for k, v in self.iou.items() if k != self.asked)

    @property
    def passed(self) -> bool:
        return self.iou[self.asked] >= MIN_IOU and self.margin >= MARGIN


@dataclass
class StrictVerdict:
    """`correct`: the judge's verdict is correct and every asked-for object's shape passes the strict
    fit. `shape`: every asked-for object was found and its shape passes. `fits`: one per asked-for
    object that was found, in prompt order (None for a missing one). `judge`: the judge's verdict."""

    correct: bool
    shape: bool
    fits: list[ShapeFit | None] = field(default_factory=list)
    judge: Verdict | None = None


def _window(cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel indices (ys, xs) of the object's box grown by half its size, where any fit may reach."""
    rows, cols = np.nonzero(cover > 0)
    grow = max(3, int(0.5 * max(np.ptp(rows), np.ptp(cols))) + 2)
    height, width = cover.shape
    y0, y1 = max(rows.min() - grow, 0), min(rows.max() + grow + 1, height)
    x0, x1 = max(cols.min() - grow, 0), min(cols.max() + grow + 1, width)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return ys.ravel(), xs.ravel()


def _iou(shape: str, params, ys, xs, cover) -> float:
    cx, cy, h = params
    ideal = _template(shape, cx, cy, h, ys, xs)
    return float(np.minimum(ideal, cover).sum() / np.maximum(ideal, cover).sum())


def fit_shape(cover: np.ndarray, shape: str) -> tuple[float, tuple[float, float, float]]:
    """The best soft IoU of an ideal `shape` with a coverage mask, over centre and half-size.

    Args:
        cover: an HxW array of coverages in 0..1 (one object).
        shape: one of the judge's shapes.

    Returns:
        (IoU, (centre x, centre y, half-size)) in pixels; the centre is that of the shape's box.
    """
    if shape not in AREA_PER_H2:
        raise ValueError(f"`shape`: got {shape!r}; expected one of {tuple(AREA_PER_H2)}")
    ys, xs = _window(cover)
    values = cover[ys, xs].astype(np.float64)
    area = values.sum()
    cx, cy = ((xs + 0.5) * values).sum() / area, ((ys + 0.5) * values).sum() / area
    h = (area / AREA_PER_H2[shape]) ** 0.5
    if shape == "triangle":  # its centroid lies a third of its half-height below its box's centre
        cy -= h / 3
    # Pattern search: try a step either way on each of centre x, centre y and half-size, keep what
    # improves, halve the steps when nothing does. Templates are sampled 4x4 per pixel, so the IoU is
    # piecewise constant at a quarter pixel, which this search (unlike a gradient) does not mind; it
    # stops at an eighth of a pixel.
    best = np.array([cx, cy, h])
    best_iou = _iou(shape, best, ys, xs, values)
    step = np.array([1.0, 1.0, 0.06 * h])
    while step[0] >= 0.12:
        improved = False
        for axis in range(3):
            for sign in (1, -1):
                trial = best.copy()
                trial[axis] += sign * step[axis]
                value = _iou(shape, trial, ys, xs, values)
                if value > best_iou + 1e-9:
                    best, best_iou, improved = trial, value, True
                    break
        if not improved:
            step = step / 2
    return best_iou, (float(best[0]), float(best[1]), float(best[2]))


def fit(cover: np.ndarray, asked: str) -> ShapeFit:
    """Fit the data set's shapes (and the `asked` one, if it is another) to one object's coverage mask;
    the verdict is for the `asked` shape."""
    ious, where = {}, None
    for shape in (*SHAPES, asked) if asked not in SHAPES else SHAPES:
        ious[shape], params = fit_shape(cover, shape)
        if shape == asked:
            where = params
    return ShapeFit(asked, ious, (where[0], where[1]), where[2])


def strict_judge(image, prompt: str) -> StrictVerdict:
    """The judge's verdict with every asked-for object's shape read strictly.

    Args:
        image: a PIL image or an HxWx3 uint8 array.
        prompt: a caption in the data set's grammar.

    Returns:
        A `StrictVerdict`.

    Raises:
        ValueError: if `prompt` is not a shapes caption.
    """
    expected = parse_caption(prompt)
    verdict = judge(image, prompt)
    fits: list[ShapeFit | None] = [None] * len(expected)
    for e, f in verdict.pairs:
        fits[e] = fit(verdict.found[f].cover, expected[e].shape)
    shape = all(item is not None and item.passed for item in fits)
    return StrictVerdict(verdict.correct and shape, shape, fits, verdict)


def summary(verdicts: list[StrictVerdict]) -> dict:
    """Strict verdicts summed up: "strict_correct" (exactly right, shapes read strictly) and
    "strict_shape" (every object's shape passes), as fractions of the images."""
    return {"strict_correct": float(np.mean([v.correct for v in verdicts])),
            "strict_shape": float(np.mean([v.shape for v in verdicts]))}


def by_pair(verdicts: list[StrictVerdict], prompts: list[str]) -> dict:
    """Where one-object prompts fail: the strict "correct" share and count per colour/shape pair
    ("orange circle") and per size word ("size small"); empty unless every prompt names one object."""
    objects = [parse_caption(prompt) for prompt in prompts]
    if not objects or any(len(found) != 1 for found in objects):
        return {}
    groups: dict[str, list[bool]] = {}
    for verdict, (obj,) in zip(verdicts, objects, strict=True):
        for key in (f"{obj.colour} {obj.shape}", f"size {obj.size}"):
            groups.setdefault(key, []).append(verdict.correct)
    return {key: {"strict": float(np.mean(values)), "n": len(values)} for key, values in sorted(groups.items())}


def strict_images(images: list, prompts: list[str]) -> dict:
    """`summary` of the strict verdicts on images and their prompts."""
    return summary([strict_judge(image, prompt) for image, prompt in zip(images, prompts, strict=True)])
