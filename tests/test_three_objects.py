"""Scenes of three objects: opt-in data, captions, layout at 64 px, the judges and the evaluation kind."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from ldm_pipeline.evaluation.judge import judge
from ldm_pipeline.evaluation.strict import strict_judge
from ldm_pipeline.training.data import open_dataset
from ldm_pipeline.shapes import BACKGROUND, CORNERS, MIN_GAP_PIXELS, ShapesDataset, caption, eval_prompts, eval_scenes, parse_caption, render, sample_scene


def _digest(dataset, indices):
    digest = hashlib.sha256()
    for i in indices:
        item = dataset[i]
        digest.update(item["text"].encode())
        digest.update(np.asarray(item["image"]).tobytes())
    return digest.hexdigest()[:16]


def test_the_bundled_models_data_is_unchanged():
    """Frozen: the recipe's data (and the evaluation prompts) as drawn before three-object scenes existed."""
    assert _digest(open_dataset("shapes", length=20_000, seed=0), [*range(300), 19_999]) == "e5c2af52f18e5b9d"
    expected = {"seen": "ee17621286f91904", "held_out": "c747e871e90947b5", "two": "b1d7900750f41350"}
    for kind, digest in expected.items():
        assert hashlib.sha256("\n".join(eval_prompts(kind, 200, 0)).encode()).hexdigest()[:16] == digest, kind


def test_max_objects_3_turns_three_object_scenes_on():
    counts = {1: 0, 2: 0, 3: 0}
    dataset = open_dataset("shapes", length=3000, seed=0, max_objects=3)
    for i in range(3000):
        counts[len(dataset.scene(i).objects)] += 1
    assert all(900 < count < 1100 for count in counts.values()), counts
    two_only = ShapesDataset(600, seed=0)
    assert max(len(two_only.scene(i).objects) for i in range(600)) == 2
    with pytest.raises(ValueError, match="`max_objects`: got 4"):
        open_dataset("shapes", max_objects=4)
    with pytest.raises(ValueError, match="`two_objects_prob`, `three_objects_prob`: got 0.7, 0.5"):
        ShapesDataset(3, two_objects_prob=0.7, three_objects_prob=0.5)


def test_a_share_of_three_object_scenes_can_be_asked_for(tmp_path):
    import json

    from ldm_pipeline.training.plan import read_stage

    dataset = open_dataset("shapes", length=3000, seed=0, max_objects=3, three_objects_prob=0.1)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(3000):
        counts[len(dataset.scene(i).objects)] += 1
    assert 240 < counts[3] < 360 and all(1250 < counts[k] < 1450 for k in (1, 2)), counts
    for bad, max_objects in ((1.5, 3), (0.1, 2), ("a lot", 3)):
        with pytest.raises(ValueError, match=f"`three_objects_prob`: got {bad!r} with `max_objects` {max_objects}"):
            open_dataset("shapes", max_objects=max_objects, three_objects_prob=bad)
    with pytest.raises(ValueError, match="`three_objects_prob`: got 0.1 for data"):
        open_dataset("some/folder", three_objects_prob=0.1)
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"stage": "unet", "max_objects": 3, "three_objects_prob": 0.1,
                                  "loop": {"output_dir": "{run}/unet"}}))
    assert read_stage(config, tmp_path)[1].three_objects_prob == 0.1
    assert read_stage(config, tmp_path, overrides={"data": str(tmp_path)})[1].three_objects_prob is None


def test_three_objects_render_apart_in_three_corners_and_captions_match():
    for i in range(60):
        scene = sample_scene(np.random.default_rng([7, i]), "train", 0.0, 1.0)
        text = caption(scene)
        assert text.count(" and ") == 2
        read = parse_caption(text)
        assert [(o.colour, o.shape, o.position, o.size) for o in read] == [
            (o.colour, o.shape, o.position, o.size) for o in scene.objects]
        assert len({o.position for o in scene.objects}) == 3 and {o.position for o in scene.objects} <= set(CORNERS)
        # three separate blobs of paint, at least MIN_GAP_PIXELS of pure background between any two
        painted = np.any(np.asarray(render(scene)) != BACKGROUND, axis=-1)
        labels, count = ndimage.label(painted, structure=np.ones((3, 3)))
        assert count == 3, text
        grown = [ndimage.binary_dilation(labels == k, iterations=MIN_GAP_PIXELS - 1) for k in (1, 2, 3)]
        assert not (grown[0] & grown[1]).any() and not (grown[0] & grown[2]).any() and not (grown[1] & grown[2]).any()


def test_the_judges_are_right_on_three_object_renders():
    for scene in eval_scenes("three", 30, seed=3):
        image, prompt = render(scene), caption(scene)
        verdict = judge(image, prompt)
        assert verdict.correct and len(verdict.found) == 3, (prompt, verdict.found)
        assert strict_judge(image, prompt).correct, prompt
    scene = eval_scenes("three", 1, seed=3)[0]
    two = type(scene)(scene.objects[:2])
    assert not judge(render(two), caption(scene)).correct  # the third object missing


def test_three_is_an_evaluation_kind_of_its_own():
    prompts = eval_prompts("three", 50, 0)
    assert all(len(parse_caption(p)) == 3 for p in prompts) and len(set(prompts)) == 50
    assert eval_prompts("three", 50, 0) == prompts and eval_prompts("three", 50, 1) != prompts
