"""The procedural shapes data set: determinism, splits, caption grammar, geometry and rendering."""

import numpy as np
import pytest
from scipy import ndimage

from ldm_pipeline.shapes import BACKGROUND, COLOURS, CORNERS, HELD_OUT_PAIRS, IMAGE_SIZE, JITTER, POSITIONS, SHAPES, SIZES, Scene, ShapeObject, ShapesDataset, caption, eval_prompts, parse_caption, render, sample_scene


def _words(obj):
    return obj.colour, obj.shape, obj.position, obj.size


def _scenes(n, split="any", prob=0.5, seed=0):
    return [sample_scene(np.random.default_rng([seed, i]), split, prob) for i in range(n)]


def test_dataset_is_deterministic_and_items_stand_alone():
    a, b = ShapesDataset(12, seed=3), ShapesDataset(12, seed=3)
    for i in range(12):
        assert a[i]["text"] == b[i]["text"]
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
    # item i depends only on (seed, i): a longer set or drawing out of order changes nothing
    assert ShapesDataset(1000, seed=3)[7]["text"] == a[7]["text"]
    assert a[-1]["text"] == a[11]["text"]
    other = ShapesDataset(12, seed=4)
    assert [other[i]["text"] for i in range(12)] != [a[i]["text"] for i in range(12)]
    assert any(not np.array_equal(np.asarray(other[i]["image"]), np.asarray(a[i]["image"])) for i in range(12))
    item = a[0]
    assert item["image"].mode == "RGB" and item["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(IndexError):
        a[12]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(3, split="test")


def test_training_split_never_shows_a_held_out_pair():
    data = ShapesDataset(5000, seed=0)
    pairs, counts = set(), {1: 0, 2: 0}
    for i in range(len(data)):
        objects = parse_caption(caption(data.scene(i)))
        pairs.update((o.colour, o.shape) for o in objects)
        counts[len(objects)] += 1
    assert not pairs & HELD_OUT_PAIRS
    assert len(pairs) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)  # every other pair does occur
    assert 2300 < counts[2] < 2700  # two_objects_prob=0.5


def test_held_out_and_any_splits():
    for scene in _scenes(300, "held_out"):
        assert len(scene.objects) == 1
        assert (scene.objects[0].colour, scene.objects[0].shape) in HELD_OUT_PAIRS
    seen = {(o.colour, o.shape) for s in _scenes(600, "any") for o in s.objects}
    assert HELD_OUT_PAIRS <= seen
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "validation")


def test_caption_grammar():
    assert caption(Scene((ShapeObject("red", "circle", "top left"),))) == "a red circle in the top left"
    assert caption(Scene((ShapeObject("blue", "square", "center", "small"),))) == "a small blue square in the center"
    assert (caption(Scene((ShapeObject("green", "triangle", "bottom right", "large"),)))
            == "a large green triangle in the bottom right")
    assert caption(Scene((ShapeObject("orange", "square", "top right"),))) == "an orange square in the top right"
    assert caption(Scene((ShapeObject("orange", "square", "top right", "small"),))).startswith("a small orange")
    two = Scene((ShapeObject("red", "circle", "top left"), ShapeObject("blue", "square", "bottom right", "large")))
    assert caption(two) == "a red circle in the top left and a large blue square in the bottom right"
    for scene in _scenes(400):
        text = caption(scene)
        for obj, phrase in zip(scene.objects, text.split(" and ")):
            article, first = phrase.split()[:2]
            assert article == ("an" if first == "orange" else "a")  # orange is the only vowel-initial word
            assert (first == obj.size) == (obj.size != "default")
        if len(scene.objects) == 2:
            first, second = scene.objects
            assert first.position in CORNERS and second.position in CORNERS and first.position != second.position
            assert text.count(" and ") == 1


def test_parse_caption_round_trips_and_rejects_other_text():
    for scene in _scenes(1000):
        parsed = parse_caption(caption(scene))
        assert [_words(o) for o in parsed] == [_words(o) for o in scene.objects]
        assert all(o.jitter == (0.0, 0.0) for o in parsed)
    assert parse_caption("  A Small Red Circle in the   center. ")[0].size == "small"
    assert parse_caption("a red circle in the center")[0].half_size == 0.14
    for bad in ["a photo of a cat", "a orange circle in the top left", "an red circle in the top left",
                "a red circle in the middle", "a red circle in the top left and", "", "a huge red circle in the center"]:
        with pytest.raises(ValueError, match="not a shapes caption"):
            parse_caption(bad)


def test_geometry_stays_in_range_and_objects_never_touch():
    for scene in _scenes(3000, prob=0.8):
        for obj in scene.objects:
            low, high = SIZES[obj.size]
            assert low <= obj.half_size <= high
            assert all(abs(j) <= JITTER for j in obj.jitter)
            left, top, right, bottom = obj.bbox
            assert 0 < left and right < 1 and 0 < top and bottom < 1
        if len(scene.objects) == 2:
            (al, at, ar, ab), (bl, bt, br, bb) = (o.bbox for o in scene.objects)
            assert max(bl - ar, al - br, bt - ab, at - bb) >= 2 / IMAGE_SIZE


def test_renders_keep_objects_apart_with_exact_colours():
    background = np.array(BACKGROUND)
    for scene in _scenes(150, prob=1.0, seed=5):
        image = np.asarray(render(scene)).astype(int)
        # every object is one connected blob of non-background pixels, antialiased edges included
        _, count = ndimage.label(np.abs(image - background).sum(axis=-1) > 0)
        assert count == 2, caption(scene)
    for name, rgb in COLOURS.items():
        for shape in SHAPES:
            obj = ShapeObject(name, shape, "center", "small", jitter=(0.013, -0.007), half_size=0.1)
            image = np.asarray(render(Scene((obj,))))
            pixels = {tuple(p) for p in image.reshape(-1, 3)}
            assert rgb in pixels and BACKGROUND in pixels
            assert len(pixels) > 2  # antialiased edges blend the two (off the 4x grid, as here)
            assert tuple(image[0, 0]) == BACKGROUND and tuple(image[32, 32]) == rgb


def test_render_draws_the_scene_where_it_says():
    obj = ShapeObject("red", "square", "top left", "default", jitter=(0.01, -0.02), half_size=0.15)
    image = np.asarray(render(Scene((obj,))))
    ys, xs = np.nonzero((image == COLOURS["red"]).all(axis=-1))
    # the fully covered pixels lie inside the square and fill nearly all of it
    left, top, right, bottom = (v * IMAGE_SIZE for v in obj.bbox)
    assert xs.min() >= left - 0.5 and xs.max() + 1 <= right + 0.5 and ys.min() >= top - 0.5 and ys.max() + 1 <= bottom + 0.5
    assert len(xs) >= (right - left - 2) * (bottom - top - 2)
    big = np.asarray(render(Scene((obj,)), image_size=128))
    assert big.shape == (128, 128, 3)
    assert np.array_equal(np.asarray(render(Scene((obj,)))), image)


def test_eval_prompts():
    assert eval_prompts("seen", 20, 0) == eval_prompts("seen", 20, 0)
    assert eval_prompts("seen", 20, 0) != eval_prompts("seen", 20, 1)
    for text in eval_prompts("seen", 100, 0):
        (obj,) = parse_caption(text)
        assert (obj.colour, obj.shape) not in HELD_OUT_PAIRS
    held = [parse_caption(t) for t in eval_prompts("held_out", 100, 0)]
    assert all(len(o) == 1 and (o[0].colour, o[0].shape) in HELD_OUT_PAIRS for o in held)
    assert {o[0].position for o in held} == set(POSITIONS)
    for text in eval_prompts("two", 100, 0):
        first, second = parse_caption(text)
        assert first.position != second.position and "center" not in (first.position, second.position)
        assert not {(first.colour, first.shape), (second.colour, second.shape)} & HELD_OUT_PAIRS
    with pytest.raises(ValueError, match="kind"):
        eval_prompts("unseen", 3, 0)


def test_split_any_shows_held_out_pairs_for_a_vae_and_is_refused_elsewhere():
    from ldm_pipeline.training.data import open_dataset
    from ldm_pipeline.training.vae import VaeConfig

    data = open_dataset("shapes", length=400, seed=2, max_objects=3, split="any")
    pairs = {(o.colour, o.shape) for i in range(400) for o in data.scene(i).objects}
    assert HELD_OUT_PAIRS <= pairs and len(pairs) == len(COLOURS) * len(SHAPES)
    assert max(len(data.scene(i).objects) for i in range(400)) == 3
    train = open_dataset("shapes", length=400, seed=2, max_objects=3)
    assert not HELD_OUT_PAIRS & {(o.colour, o.shape) for i in range(400) for o in train.scene(i).objects}
    assert VaeConfig(loop=None, split="any").split == "any"
    with pytest.raises(ValueError, match=r"`split`: got 'held_out'; expected 'train' or 'any'"):
        open_dataset("shapes", split="held_out")
    with pytest.raises(ValueError, match=r"`split`: got 'any' for data 'some/folder'"):
        open_dataset("some/folder", split="any")
