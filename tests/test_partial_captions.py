"""Partial captions: some object phrases name only the colour or only the shape; scenes unchanged."""

import json
import re

import numpy as np
import pytest

from ldm_pipeline.training.data import open_dataset
from ldm_pipeline.training.plan import build_tokenizer, read_stage
from ldm_pipeline.shapes import COLOURS, PARTIAL_NOUN, POSITIONS, SHAPES, ShapesDataset, caption

_PLACE = "in the (?:{})".format("|".join(POSITIONS))
_COLOUR_ONLY = re.compile(r"an? (?:(?:small|large) )?(?P<colour>\w+) {} {}".format(PARTIAL_NOUN, _PLACE))
_SHAPE_ONLY = re.compile(r"an? (?:(?:small|large) )?(?P<shape>circle|square|triangle) {}".format(_PLACE))


def test_partial_phrases_name_colour_or_shape_of_the_same_scene():
    full = open_dataset("shapes", length=2000, seed=3, max_objects=3)
    partial = open_dataset("shapes", length=2000, seed=3, max_objects=3, partial_captions=0.3)
    counts = {"full": 0, "colour": 0, "shape": 0}
    for i in range(0, 2000, 4):
        scene = partial.scene(i)
        assert scene == full.scene(i)  # only the words change
        assert np.array_equal(np.asarray(partial[i]["image"]), np.asarray(full[i]["image"]))
        phrases = partial[i]["text"].split(" and ")
        assert len(phrases) == len(scene.objects)
        for phrase, obj, whole in zip(phrases, scene.objects, caption(scene).split(" and ")):
            if phrase == whole:
                counts["full"] += 1
            elif match := _COLOUR_ONLY.fullmatch(phrase):
                assert match["colour"] == obj.colour and match["colour"] in COLOURS
                counts["colour"] += 1
            else:
                match = _SHAPE_ONLY.fullmatch(phrase)
                assert match and match["shape"] == obj.shape in SHAPES, phrase
                assert phrase.endswith(obj.position)
                counts["shape"] += 1
    total = sum(counts.values())
    assert 0.25 < (counts["colour"] + counts["shape"]) / total < 0.35, counts
    assert abs(counts["colour"] - counts["shape"]) < 0.1 * total, counts
    # the same words every time an item is read, and the article agrees with the next word
    assert [partial[i]["text"] for i in range(40)] == [partial[i]["text"] for i in range(40)]
    assert not any(" a orange" in partial[i]["text"] or " an red" in partial[i]["text"] for i in range(400))


def test_without_the_key_captions_are_whole_and_bad_chances_are_refused():
    dataset = ShapesDataset(200, seed=0)
    assert all(dataset[i]["text"] == caption(dataset.scene(i)) for i in range(200))
    with pytest.raises(ValueError, match="`partial_captions`: got 1.5"):
        ShapesDataset(3, partial_captions=1.5)
    with pytest.raises(ValueError, match="`partial_captions`: got 0.2 for data"):
        open_dataset("some/folder", partial_captions=0.2)


def test_stage_configs_read_the_key_and_the_tokenizer_learns_the_noun(tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"stage": "unet", "partial_captions": 0.2, "max_objects": 3,
                                  "loop": {"output_dir": "{run}/unet"}}))
    stage, unet = read_stage(config, tmp_path)
    assert stage == "unet" and unet.partial_captions == 0.2 and unet.max_objects == 3
    tokenizer = build_tokenizer({"captions": 400, "vocab_size": 700, "model_max_length": 32,
                                 "partial_captions": 0.5, "output_dir": str(tmp_path / "tok")})
    assert tokenizer.tokenize(f"a red {PARTIAL_NOUN}") == tokenizer.tokenize("a red")[:2] + [f"{PARTIAL_NOUN}</w>"]


def test_data_override_with_a_folder_drops_the_shapes_only_settings(tmp_path):
    config = tmp_path / "clip.json"
    config.write_text(json.dumps({"stage": "clip", "max_objects": 3, "partial_captions": 0.25,
                                  "loop": {"output_dir": "{run}/clip"}}))
    _, shapes = read_stage(config, tmp_path, overrides={"data": "shapes"})
    assert (shapes.max_objects, shapes.partial_captions) == (3, 0.25)
    _, folder = read_stage(config, tmp_path, overrides={"data": str(tmp_path / "photos")})
    assert folder.data == str(tmp_path / "photos") and (folder.max_objects, folder.partial_captions) == (2, 0.0)
