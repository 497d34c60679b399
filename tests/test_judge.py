"""The shapes judge: right on the data set's own renders, and says wrong when the image disagrees."""

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.evaluation.judge import find_objects, judge
from ldm_pipeline.shapes import BACKGROUND, COLOURS, SHAPES, SIZES, Scene, ShapeObject, caption, render, sample_scene


def _scene(*objects):
    return Scene(tuple(ShapeObject(*o) if isinstance(o, tuple) else o for o in objects))


@pytest.mark.parametrize("split, two_objects_prob", [("any", 0.0), ("held_out", 0.0), ("any", 1.0)])
def test_judge_is_right_on_ground_truth(split, two_objects_prob):
    """300 of 300 renders of each kind: the README's "right on 100 % of ground-truth renders"."""
    wrong = []
    for i in range(300):
        scene = sample_scene(np.random.default_rng([11, i]), split, two_objects_prob)
        verdict = judge(render(scene), caption(scene))
        if not (verdict.correct and verdict.size):
            wrong.append((caption(scene), verdict.found))
    assert wrong == []


def test_every_colour_shape_and_size_extreme_is_read():
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for shape in SHAPES:
            for size, (low, high) in SIZES.items():
                for half_size, position in [(low, "top left"), (high, "bottom right")]:
                    obj = ShapeObject(colour, shape, position, size, tuple(rng.uniform(-0.03, 0.03, 2)), half_size)
                    (found,) = find_objects(render(Scene((obj,))))
                    assert (found.colour, found.shape, found.position, found.size) == (colour, shape, position, size)


def test_found_objects_report_area_and_centroid():
    obj = ShapeObject("blue", "square", "bottom left", "large", (0.02, -0.01), 0.18)
    found = find_objects(np.asarray(render(Scene((obj,)))))  # an array works as well as an image
    assert len(found) == 1
    assert found[0].centroid == pytest.approx(obj.centre, abs=0.01)
    assert abs(found[0].area - 4 * (0.18 * 64) ** 2) < 2 * 4 * 0.18 * 64  # within a one-pixel rim
    # a larger image gives the same reading, the area scaled with it
    (big,) = find_objects(render(Scene((obj,)), image_size=128))
    assert (big.colour, big.shape, big.position, big.size) == ("blue", "square", "bottom left", "large")
    assert big.area == pytest.approx(4 * found[0].area, rel=0.1)


def test_judge_says_wrong_when_one_attribute_differs():
    image = render(_scene(("red", "circle", "top left")))
    assert judge(image, "a red circle in the top left").correct
    verdict = judge(image, "a blue circle in the top left")
    assert (verdict.correct, verdict.colour, verdict.shape, verdict.position) == (False, False, True, True)
    verdict = judge(image, "a red triangle in the top left")
    assert (verdict.correct, verdict.colour, verdict.shape, verdict.position) == (False, True, False, True)
    verdict = judge(image, "a red circle in the bottom right")
    assert (verdict.correct, verdict.colour, verdict.shape, verdict.position) == (False, True, True, False)
    verdict = judge(image, "a large red circle in the top left")  # size is reported, not required
    assert verdict.correct and not verdict.size
    assert (verdict.extra, verdict.missing) == (0, 0)


def test_two_objects_are_matched_to_the_right_phrases():
    image = render(_scene(("red", "circle", "top left"), ("green", "square", "bottom right", "large", (0, 0), 0.18)))
    assert judge(image, "a large green square in the bottom right and a red circle in the top left").correct
    # swapping the positions keeps colours and shapes right, but not positions
    verdict = judge(image, "a red circle in the bottom right and a large green square in the top left")
    assert (verdict.correct, verdict.colour, verdict.shape, verdict.position) == (False, True, True, False)
    # swapping the shapes: the greedy matching pairs objects by colour and position first
    verdict = judge(image, "a red square in the top left and a large green circle in the bottom right")
    assert (verdict.correct, verdict.colour, verdict.shape, verdict.position) == (False, True, False, True)


def test_extra_and_missing_objects_are_counted():
    two = render(_scene(("yellow", "triangle", "top right"), ("black", "circle", "bottom left")))
    verdict = judge(two, "a yellow triangle in the top right")
    assert not verdict.correct and (verdict.extra, verdict.missing) == (1, 0)
    assert verdict.colour and verdict.shape and verdict.position  # the asked-for object itself is right
    one = render(_scene(("yellow", "triangle", "top right")))
    verdict = judge(one, "a yellow triangle in the top right and a black circle in the bottom left")
    assert not verdict.correct and (verdict.extra, verdict.missing) == (0, 1) and not verdict.colour
    empty = Image.new("RGB", (64, 64), BACKGROUND)
    assert find_objects(empty) == []
    verdict = judge(empty, "a red circle in the top left and a blue square in the bottom right")
    assert (verdict.correct, verdict.colour, verdict.shape, verdict.position) == (False, False, False, False)
    assert (verdict.extra, verdict.missing, verdict.found) == (0, 2, [])


def test_specks_and_foreign_colours_are_ignored():
    image = np.asarray(render(_scene(("white", "square", "center")))).copy()
    image[2:4, 2:4] = COLOURS["red"]       # 4 pixels: below the minimum area
    image[50:60, 2:12] = (0, 255, 255)     # cyan is far from every palette colour
    (found,) = find_objects(image)
    assert (found.colour, found.shape, found.position) == ("white", "square", "center")


def test_judge_rejects_prompts_outside_the_grammar():
    with pytest.raises(ValueError, match="a photo of a cat"):
        judge(Image.new("RGB", (64, 64), BACKGROUND), "a photo of a cat")
    with pytest.raises(ValueError, match="HxWx3"):
        find_objects(np.zeros((64, 64), np.uint8))
