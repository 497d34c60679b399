"""Composed prompts (`A AND B :0.5`, guidance/composition.py): parsing, the guided prediction, batches, recipes, CLI."""

import numpy as np
import pytest
import torch

from ldm_pipeline.guidance import composition
from ldm_pipeline import read_recipe
from ldm_pipeline.apps.cli import main
from ldm_pipeline.guidance.base import ClassifierFree

FAST = dict(num_inference_steps=3, progress=False, output_type="np")
A, B = "a red circle in the top left", "a blue square in the bottom right"


@pytest.mark.parametrize("prompt, parts", [
    ("a red circle", [("a red circle", 1.0)]),
    ("a red circle AND a blue square", [("a red circle", 1.0), ("a blue square", 1.0)]),
    ("a red circle :1.5 AND a blue square: -0.5", [("a red circle", 1.5), ("a blue square", -0.5)]),
    ("a (red:1.5) circle AND  b :.25 AND c", [("a (red:1.5) circle", 1.0), ("b", 0.25), ("c", 1.0)]),
    ("a cat and a dog", [("a cat and a dog", 1.0)]),  # lower case: text
    ("ANDROID BAND", [("ANDROID BAND", 1.0)]),  # AND inside a word: text
    ("  spaced  ", [("  spaced  ", 1.0)]),  # one part keeps its text exactly
    ("a ratio 2:3 AND b", [("a ratio 2", 3.0), ("b", 1.0)]),  # as the web UI reads it
])
def test_split_prompt(prompt, parts):
    assert composition.split_prompt(prompt) == parts


def test_prompts_of_fewer_parts_are_filled_at_weight_zero():
    slots, weights = composition.split_prompts(["x AND y :2 AND z", "p", "q AND r"])
    assert slots == [["x", "p", "q"], ["y", "p", "r"], ["z", "p", "q"]]
    assert weights.tolist() == [[1, 1, 1], [2, 0, 1], [1, 0, 0]]


def test_composed_guidance_is_the_weighted_sum_and_one_part_is_classifier_free():
    generator = torch.Generator().manual_seed(0)
    uncond, first, second, third = (torch.randn(2, 4, 3, 3, generator=generator) for _ in range(4))
    weights = torch.tensor([[1.0, 0.5], [2.0, 0.0], [-1.0, 1.0]])
    guided = composition.Composed(torch.zeros(2, 5, 8), [torch.zeros(2, 5, 8)] * 2, weights, 3.0)(
        first, [uncond, second, third], None)
    for i in range(2):
        expected = uncond[i] + 3.0 * sum(w * (c[i] - uncond[i]) for w, c in zip(weights[:, i], (first, second, third)))
        torch.testing.assert_close(guided[i], expected)
    single = composition.Composed(torch.zeros(2, 5, 8), [], torch.ones(1, 2), 3.0)(first, [uncond], None)
    assert torch.equal(single, ClassifierFree(torch.zeros(2, 5, 8), 3.0)(first, [uncond], None))
    with pytest.raises(ValueError, match=r"`weights`: shape \(2, 2\); expected \(3, 2\)"):
        composition.Composed(torch.zeros(2, 5, 8), [torch.zeros(2, 5, 8)] * 2, torch.ones(2, 2), 3.0)


def test_composition_reaches_the_pixels(pipe):
    plain = pipe(A, seed=0, **FAST).images
    assert np.array_equal(pipe(A, seed=0, prompt_composition=True, **FAST).images, plain)  # no AND: unchanged
    composed = pipe(f"{A} AND {B}", seed=0, prompt_composition=True, **FAST).images
    assert not np.allclose(composed, plain, atol=1e-3)
    assert not np.allclose(composed, pipe(f"{A} AND {B}", seed=0, **FAST).images, atol=1e-3)  # off: AND is text
    # a part of weight 0 adds nothing; two halves of one prompt are that prompt (up to float rounding)
    np.testing.assert_allclose(pipe(f"{A} AND {B} :0", seed=0, prompt_composition=True, **FAST).images, plain,
                               atol=1e-5)
    np.testing.assert_allclose(pipe(f"{A} :0.5 AND {A} :0.5", seed=0, prompt_composition=True, **FAST).images,
                               plain, atol=1e-5)


def test_a_batch_mixes_prompts_with_and_without_parts(pipe):
    prompts = [f"{A} AND {B}", B]
    batch = pipe(prompts, seed=4, num_images_per_prompt=2, prompt_composition=True, **FAST).images
    alone = [pipe(prompt, seed=[4 + 2 * i, 5 + 2 * i], num_images_per_prompt=2, prompt_composition=True,
                  **FAST).images for i, prompt in enumerate(prompts)]
    np.testing.assert_allclose(batch, np.concatenate(alone), atol=1e-5)


def test_composition_without_classifier_free_guidance_still_guides_each_part(pipe):
    plain = pipe(A, seed=1, guidance_scale=1.0, **FAST).images
    np.testing.assert_allclose(pipe(f"{A} AND {B} :0", seed=1, guidance_scale=1.0, prompt_composition=True,
                                    **FAST).images, plain, atol=1e-5)
    assert not np.allclose(pipe(f"{A} AND {B}", seed=1, guidance_scale=1.0, prompt_composition=True,
                                **FAST).images, plain, atol=1e-3)


def test_bad_composition_arguments_are_refused_before_the_text_encoder_runs(pipe, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the text encoder ran")

    monkeypatch.setattr(pipe.text_encoder, "forward", forbidden)
    with pytest.raises(TypeError, match=r"`prompt_composition`: got 'yes'; expected True or False"):
        pipe(A, prompt_composition="yes", **FAST)
    embeds = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)
    with pytest.raises(ValueError, match=r"`prompt_composition`: .*only `prompt_embeds`"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, prompt_composition=True, **FAST)


def test_composed_images_carry_it_in_their_recipe_and_draw_again(pipe, tmp_path):
    result = pipe(f"{A} AND {B} :0.7", seed=2, num_inference_steps=3, progress=False, prompt_composition=True)
    [path] = result.save(tmp_path / "composed.png")
    recipe = read_recipe(path)
    assert recipe.prompt_composition is True and recipe.prompt == f"{A} AND {B} :0.7"
    again = pipe.reproduce(path, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    [plain] = pipe(A, seed=2, num_inference_steps=3, progress=False).save(tmp_path / "plain.png")
    assert read_recipe(plain).prompt_composition is False


def test_cli_generate_reads_and_with_the_flag(model, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", f"{A} AND {B}", "--prompt-composition", "--model", str(model), "--steps", "2",
                 "--seed", "1", "--size", "16x16", "--out", str(out)]) == 0
    assert read_recipe(out).prompt_composition is True
    assert main(["generate", "--from", str(out), "--prompt-composition", "--model", str(model),
                 "--out", str(tmp_path / "y.png")]) == 2  # the recipe says it


def test_shapes_sets_draw_composed_captions_and_judge_the_plain_ones():
    from ldm_pipeline.evaluation import report as rep

    [three] = rep.shapes_sets(4, seed=5, kinds=("three",), composed=True)
    [plain] = rep.shapes_sets(4, seed=5, kinds=("three",))
    assert three.prompts == plain.prompts and plain.drawn is None
    assert [d.replace(" AND ", " and ") for d in three.drawn] == three.prompts
    assert all(len(composition.split_prompt(d)) == 3 for d in three.drawn)


# -- regions ---------------------------------------------------------------------------------

TL, BR = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)


def test_region_weights_keep_each_part_to_its_box_and_share_the_rest():
    slots, weights = composition.split_prompts([f"{A} AND {B} :2", "p"])
    masks = composition.region_weights(weights, [[TL, BR], None], 4, 4)
    assert masks.shape == (2, 2, 1, 4, 4)
    first, second = masks[0, 0, 0], masks[1, 0, 0]
    assert first[:2, :2].eq(1).all() and first[2:, 2:].eq(0).all() and second[2:, 2:].eq(2).all()
    assert second[:2, :2].eq(0).all()
    # the quadrants in no box are shared: half of each part's weight
    assert first[:2, 2:].eq(0.5).all() and second[2:, :2].eq(1.0).all()
    assert masks[0, 1].eq(1).all() and masks[1, 1].eq(0).all()  # no regions: its weights everywhere
    whole = composition.region_weights(weights, [[None, TL], None], 4, 4)
    assert whole[0, 0].eq(1).all() and whole[1, 0, 0, :2, :2].eq(2).all() and whole[1, 0, 0, 2:].eq(0).all()


@pytest.mark.parametrize("regions, error, match", [
    ([TL, BR], ValueError, r"pass prompt_composition=True"),
    ("TL", TypeError, r"`regions`: got str"),
    ([TL], ValueError, r"prompt 0 has 2 part\(s\)"),
    ([TL, (0.5, 0.5, 0.5, 1.0)], ValueError, r"prompt 0, part 1 is \(0.5, 0.5, 0.5, 1.0\); expected 0 <= left < right"),
    ([TL, (0, 0, 1.5, 1)], ValueError, r"0 <= left < right <= 1"),
    ([TL, (0, 0, float("nan"), 1)], ValueError, r"expected \(left, top, right, bottom\)"),
    ([TL, (0, 0, 1)], ValueError, r"expected \(left, top, right, bottom\)"),
    ([TL, (0, 0, True, 1)], ValueError, r"expected \(left, top, right, bottom\)"),
])
def test_bad_regions_are_refused_before_the_text_encoder_runs(pipe, monkeypatch, regions, error, match):
    def forbidden(*args, **kwargs):
        raise AssertionError("the text encoder ran")

    monkeypatch.setattr(pipe.text_encoder, "forward", forbidden)
    with pytest.raises(error, match=match):
        pipe(f"{A} AND {B}", regions=regions, prompt_composition=match != r"pass prompt_composition=True", **FAST)


def test_regions_per_prompt_for_a_list_of_prompts(pipe):
    with pytest.raises(ValueError, match=r"`regions`: 1 lists of boxes for 2 prompts"):
        pipe([f"{A} AND {B}", A], regions=[[TL, BR]], prompt_composition=True, **FAST)
    plain = pipe([f"{A} AND {B}", A], seed=0, prompt_composition=True, **FAST).images
    # boxes of None are the whole image: the same pixels as no regions
    assert np.array_equal(pipe([f"{A} AND {B}", A], seed=0, prompt_composition=True, regions=[[None, None], None],
                               **FAST).images, plain)
    boxed = pipe([f"{A} AND {B}", A], seed=0, prompt_composition=True, regions=[[TL, BR], None], **FAST).images
    assert not np.allclose(boxed[0], plain[0], atol=1e-3)
    np.testing.assert_allclose(boxed[1], plain[1], atol=1e-5)  # the prompt without regions is unchanged


def test_regions_are_in_the_recipe_and_draw_again(pipe, model, tmp_path):
    result = pipe(f"{A} AND {B}", seed=2, num_inference_steps=3, progress=False, prompt_composition=True,
                  regions=[TL, BR])
    [path] = result.save(tmp_path / "regions.png")
    assert read_recipe(path).regions == [list(TL), list(BR)]
    again = pipe.reproduce(path, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    out = tmp_path / "cli.png"
    assert main(["generate", f"{A} AND {B}", "--prompt-composition", "--region", "0,0,0.5,0.5", "--region", "all",
                 "--model", str(model), "--steps", "2", "--seed", "1", "--size", "16x16", "--out", str(out)]) == 0
    assert read_recipe(out).regions == [[0, 0, 0.5, 0.5], None]
    assert main(["generate", f"{A} AND {B}", "--prompt-composition", "--region", "0,0,0.5,0.5",
                 "--model", str(model), "--steps", "2", "--out", str(out)]) == 2  # one box for two parts


def test_every_shapes_object_lies_in_its_positions_box():
    from ldm_pipeline.evaluation import report as rep
    from ldm_pipeline.shapes import ShapesDataset, scene_regions

    data = ShapesDataset.with_max_objects(600, seed=9, max_objects=3)
    for i in range(600):
        scene = data.scene(i)
        for obj, (left, top, right, bottom) in zip(scene.objects, scene_regions(scene), strict=True):
            x0, y0, x1, y1 = obj.bbox
            assert left <= x0 and x1 <= right and top <= y0 and y1 <= bottom, (obj, i)
    [three] = rep.shapes_sets(4, seed=5, kinds=("three",), regions=True)
    assert all(len(r) == 3 for r in three.regions) and all(" AND " in d for d in three.drawn)


def test_a_model_may_store_its_guidance_for_composed_prompts_in_regions(components, tmp_path):
    from ldm_pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**components, defaults={"guidance_scale": 4.0, "regions_guidance_scale": 1.5})
    assert pipe(f"{A} AND {B}", prompt_composition=True, regions=[TL, BR], seed=0, **FAST).guidance_scale == 1.5
    assert pipe(f"{A} AND {B}", prompt_composition=True, seed=0, **FAST).guidance_scale == 4.0
    assert pipe(A, seed=0, **FAST).guidance_scale == 4.0
    assert pipe(f"{A} AND {B}", prompt_composition=True, regions=[TL, BR], guidance_scale=3.0, seed=0,
                **FAST).guidance_scale == 3.0
    again = LatentDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    assert again.defaults["regions_guidance_scale"] == 1.5
    # a model without the key uses its guidance_scale for regions too
    plain = LatentDiffusionPipeline(**components, defaults={"guidance_scale": 4.0})
    assert plain(f"{A} AND {B}", prompt_composition=True, regions=[TL, BR], seed=0, **FAST).guidance_scale == 4.0
