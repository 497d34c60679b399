"""The strict shape measure: the renderer's own shapes pass, shapes blended between ours fail."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm_pipeline.evaluation import strict
from ldm_pipeline.evaluation.judge import find_objects
from ldm_pipeline.evaluation.strict import fit, fit_shape, strict_images, strict_judge
from ldm_pipeline.shapes import BACKGROUND, COLOURS, SHAPES, SIZES, SUPERSAMPLE, Scene, ShapeObject, caption, render, sample_scene


def _blend(kind: str, amount: float, colour: str, centre, half_size: float, size: int = 64) -> Image.Image:
    """A shape between ours, drawn as the renderer draws (4x supersampled, box-filtered down)."""
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x, y, h = centre[0] * side, centre[1] * side, half_size * side
    fill = COLOURS[colour]
    if kind == "rounded":  # a square whose corners are quarter circles of radius amount * h
        draw.rounded_rectangle([x - h, y - h, x + h, y + h], radius=amount * h, fill=fill)
    elif kind == "squircle":  # |x|^n + |y|^n = h^n
        t = np.linspace(0, 2 * np.pi, 400)
        c, s = np.cos(t), np.sin(t)
        draw.polygon(list(zip(x + h * np.sign(c) * np.abs(c) ** (2 / amount),
                              y + h * np.sign(s) * np.abs(s) ** (2 / amount))), fill=fill)
    elif kind == "dome":  # a square whose top is half an ellipse rising amount * 2h
        dome = amount * 2 * h
        draw.rectangle([x - h, y - h + dome, x + h, y + h], fill=fill)
        draw.pieslice([x - h, y - h, x + h, y - h + 2 * dome], 180, 360, fill=fill)
    elif kind == "rounded_triangle":  # a triangle whose corners are arcs of radius amount * h
        radius = amount * h
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).polygon([(x, y - h), (x - h, y + h), (x + h, y + h)], fill=255)
        inner = np.asarray(mask) > 0
        from scipy import ndimage
        eroded = ndimage.binary_erosion(inner, iterations=int(radius))
        rounded = ndimage.binary_dilation(eroded, iterations=int(radius))
        canvas.paste(Image.new("RGB", (side, side), fill), mask=Image.fromarray((rounded * 255).astype(np.uint8)))
    return canvas.resize((size, size), Image.BOX)


BLENDS = [  # (kind, amount, the shape it is asked as): every one must fail
    ("rounded", 0.4, "square"), ("rounded", 0.5, "square"), ("rounded", 0.6, "square"), ("rounded", 0.6, "circle"),
    ("rounded", 0.8, "circle"), ("squircle", 2.5, "circle"), ("squircle", 3, "circle"), ("squircle", 4, "square"),
    ("squircle", 5, "square"), ("dome", 0.25, "square"), ("dome", 0.5, "square"), ("dome", 0.5, "circle"),
    ("rounded_triangle", 0.4, "triangle"),
]


def test_rendered_shapes_pass():
    """Every shape in every colour at both ends of every size range, anywhere in its jitter: all pass."""
    rng = np.random.default_rng(0)
    failed = []
    for colour in COLOURS:
        for shape in SHAPES:
            for size, (low, high) in SIZES.items():
                for half_size in (low, high):
                    obj = ShapeObject(colour, shape, "center", size, tuple(rng.uniform(-0.03, 0.03, 2)), half_size)
                    scene = Scene((obj,))
                    verdict = strict_judge(render(scene), caption(scene))
                    if not verdict.correct:
                        failed.append((caption(scene), verdict.fits))
    assert failed == []


def test_rendered_scenes_pass():
    scenes = [sample_scene(np.random.default_rng([21, i]), "any", 0.5) for i in range(40)]
    assert strict_images([render(s) for s in scenes], [caption(s) for s in scenes]) == {
        "strict_correct": 1.0, "strict_shape": 1.0}


@pytest.mark.parametrize("kind, amount, asked", BLENDS)
def test_blended_shapes_fail(kind, amount, asked):
    rng = np.random.default_rng(1)
    for colour, half_size in [("red", 0.09), ("white", 0.14), ("orange", 0.185), ("purple", 0.14)]:
        image = _blend(kind, amount, colour, 0.5 + rng.uniform(-0.03, 0.03, 2), half_size)
        (found,) = find_objects(image)
        result = fit(found.cover, asked)
        assert not result.passed, (kind, amount, colour, result)
        prompt = caption(Scene((ShapeObject(colour, asked, "center"),)))
        assert not strict_judge(image, prompt).correct


def test_the_lenient_judge_passes_what_the_strict_measure_fails():
    """Why the measure exists: the judge reads a rounded square as a square and a squircle as a circle."""
    rounded = _blend("rounded", 0.5, "white", (0.5, 0.5), 0.14)
    (found,) = find_objects(rounded)
    assert found.shape == "square"
    verdict = strict_judge(rounded, "a white square in the center")
    assert not verdict.correct and not verdict.shape
    assert verdict.fits[0].iou["square"] > 0.9  # a good fit, but not clearly better than a circle's
    assert 0 < verdict.fits[0].margin < strict.MARGIN


def test_slightly_rounded_corners_are_within_tolerance():
    """Corners rounded by a fifth of the half-size (a pixel or two) still pass: the line is drawn between."""
    image = _blend("rounded", 0.2, "blue", (0.5, 0.5), 0.14)
    assert strict_judge(image, "a blue square in the center").correct


def test_fit_finds_centre_and_scale():
    obj = ShapeObject("green", "triangle", "top left", "large", (0.02, -0.01), 0.18)
    (found,) = find_objects(render(Scene((obj,))))
    iou, (cx, cy, h) = fit_shape(found.cover, "triangle")
    assert iou > 0.98
    assert (cx / 64, cy / 64) == pytest.approx(obj.centre, abs=0.5 / 64)
    assert h / 64 == pytest.approx(0.18, abs=0.5 / 64)
    with pytest.raises(ValueError, match="`shape`: got 'hexagon'"):
        fit_shape(found.cover, "hexagon")


def test_a_missing_or_wrong_object_is_not_strictly_right():
    image = render(Scene((ShapeObject("red", "circle", "top left"),)))
    verdict = strict_judge(image, "a red circle in the top left and a blue square in the bottom right")
    assert not verdict.correct and not verdict.shape and verdict.fits[1] is None
    verdict = strict_judge(image, "a red square in the top left")
    assert not verdict.correct and not verdict.fits[0].passed


def test_prompt_accuracy_reports_the_strict_measure_beside_the_judge():
    from ldm_pipeline.evaluation.accuracy import judge_images

    images = [_blend("rounded", 0.5, "blue", (0.5, 0.5), 0.14), render(Scene((ShapeObject("blue", "square", "center"),)))]
    scores = judge_images(images, ["a blue square in the center"] * 2)
    assert scores["correct"] == 1.0 and scores["shape"] == 1.0  # the judge forgives the rounded corners
    assert scores["strict_correct"] == scores["strict_shape"] == 0.5


def test_one_object_verdicts_are_broken_down_by_pair_and_size():
    from ldm_pipeline.evaluation.accuracy import judge_images

    rounded = _blend("rounded", 0.5, "orange", (0.27, 0.27), 0.14)  # an orange circle drawn as a rounded square
    images = [rounded, render(Scene((ShapeObject("orange", "circle", "top left"),))),
              render(Scene((ShapeObject("white", "square", "center", "small", half_size=0.1),)))]
    prompts = ["an orange circle in the top left", "an orange circle in the top left", "a small white square in the center"]
    pairs = judge_images(images, prompts)["strict_by_pair"]
    assert pairs == {"orange circle": {"strict": 0.5, "n": 2}, "size default": {"strict": 0.5, "n": 2},
                     "size small": {"strict": 1.0, "n": 1}, "white square": {"strict": 1.0, "n": 1}}
    two = "a red circle in the top left and a blue square in the bottom right"
    assert "strict_by_pair" not in judge_images(images[:1] + [render(sample_scene(np.random.default_rng(0)))],
                                                prompts[:1] + [two])  # only for one-object sets
