"""Prompt accuracy bookkeeping, checked with a stand-in pipeline that draws the ground truth."""

from types import SimpleNamespace

import pytest
import scipy.stats

from ldm_pipeline.evaluation.accuracy import KINDS, judge_images, scenes_for, training_captions
from ldm_pipeline.evaluation.report import draw
from ldm_pipeline.shapes import Scene, caption, parse_caption, render


class GroundTruth:
    """Draws exactly what each prompt asks for; with `swap`, puts every object in the wrong place."""

    def __init__(self, swap=False):
        self.swap = swap

    def __call__(self, prompts, seed, progress, **kwargs):
        images = []
        for prompt in prompts:
            objects = parse_caption(prompt)
            if self.swap:
                flip = {"top left": "bottom right", "bottom right": "top left", "top right": "bottom left",
                        "bottom left": "top right", "center": "top left"}
                objects = [obj.__class__(obj.colour, obj.shape, flip[obj.position], obj.size, obj.jitter,
                                         obj.half_size) for obj in objects]
            images.append(render(Scene(tuple(objects))))
        return SimpleNamespace(images=images)


def prompt_accuracy(pipe, kinds=KINDS, n=12):
    """Per kind: draw n prompts in batches of 5 and judge them."""
    summary, images = {}, {}
    for kind in kinds:
        prompts = prompts_for(kind, n)
        images[kind], _, _ = draw(pipe, prompts, list(range(n)), batch_size=5)
        summary[kind] = {"n": len(images[kind]), **judge_images(images[kind], prompts)}
    return summary, images


def prompts_for(kind, n, seed=0, exclude=frozenset()):
    return [caption(scene) for scene in scenes_for(kind, n, seed, exclude)]


def test_ground_truth_scores_one_and_wrong_positions_score_zero():
    summary, images = prompt_accuracy(GroundTruth(), n=12)
    assert set(summary) == {"seen", "held_out", "two", "three"}
    for kind in summary.values():
        assert kind["n"] == 12 and kind["correct"] == 1.0 and kind["position"] == 1.0 and kind["extra"] == 0
    assert summary["three"]["strict_correct"] == 1.0
    swapped, _ = prompt_accuracy(GroundTruth(swap=True), kinds=("seen", "two"), n=12)
    assert swapped["seen"]["position"] == 0.0 and swapped["seen"]["colour"] == 1.0
    assert swapped["two"]["correct"] == 0.0
    assert len(images["two"]) == 12


def test_evaluation_prompts_leave_out_training_captions():
    seen = training_captions(2000)
    two = prompts_for("two", 30, seed=0, exclude=seen)
    assert len(two) == 30 and not set(two) & seen
    held_out = prompts_for("held_out", 10, exclude=seen)
    assert not set(held_out) & seen  # held-out pairs never appear in training at all


def test_wilson_intervals_agree_with_scipy_and_stay_in_0_to_1():
    from ldm_pipeline.evaluation.accuracy import intervals, wilson_interval

    for successes, n in [(0, 10), (5, 10), (10, 10), (8, 12), (188, 200), (197, 200), (200, 200)]:
        expected = scipy.stats.binomtest(successes, n).proportion_ci(method="wilson")
        assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-9)
    low, high = wilson_interval(200, 200)
    assert high == 1.0 and 0.98 < low < 0.985  # all 200 right still only bounds the rate below
    assert intervals({"n": 200, "correct": 1.0, "strict_correct": 0.94, "fid": 5.0}) == {
        "correct": list(wilson_interval(200, 200)), "strict_correct": list(wilson_interval(188, 200))}
    with pytest.raises(ValueError, match="successes.*201.*n = 200"):
        wilson_interval(201, 200)
