"""One place for a call's settings: `GenerationSettings` and the stages `__call__` runs."""

import dataclasses
import inspect

import numpy as np
import PIL.Image
import pytest
import torch

from ldm_pipeline import LatentDiffusionPipeline, Recipe, stages
from ldm_pipeline.apps.cli import build_parser
from ldm_pipeline.provenance import infotext
from ldm_pipeline.sampling.loop import denoise
from ldm_pipeline.sampling import schedulers
from ldm_pipeline.settings import CALL, IMAGE, PROMPT, GenerationSettings, default, fields_of, meta

FAST = dict(num_inference_steps=3, progress=False)


def test_the_call_signature_is_the_settings_names_order_and_defaults():
    parameters = list(inspect.signature(LatentDiffusionPipeline.__call__).parameters.values())[1:]
    fields = dataclasses.fields(GenerationSettings)
    assert [p.name for p in parameters] == [f.name for f in fields]
    assert {p.name: p.default for p in parameters} == {f.name: f.default for f in fields}


def test_settings_are_frozen_and_replace_makes_a_new_one():
    settings = GenerationSettings(prompt="a cat")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.prompt = "a dog"
    other = settings.replace(seed=3)
    assert (settings.seed, other.seed, other.prompt) == (None, 3, "a cat")


def test_every_kept_setting_is_a_recipe_field_with_its_recipe_default():
    recipe_fields = {f.name: f for f in dataclasses.fields(Recipe)}
    kept = [f for f in dataclasses.fields(GenerationSettings) if meta(f.name).recorded is not None]
    assert {f.name for f in kept} >= {"prompt", "seed", "num_inference_steps", "guidance_scale", "strength", "eta",
                                      "regions", "clip_guidance_scale"}
    for f in kept:
        assert recipe_fields[f.name].default == meta(f.name).recipe_default, f.name
    unkept = {f.name for f in dataclasses.fields(GenerationSettings)} - {f.name for f in kept}
    assert unkept >= {"generator", "latents", "callback", "preview", "prompt_embeds", "output_type"}
    assert not unkept & set(recipe_fields)


def test_the_recipe_of_a_call_holds_its_settings_per_image_per_prompt_and_per_call(pipe):
    result = pipe(["a red circle AND a blue square", "a cat"], negative_prompt=["blurry", ""], seed=7,
                  num_images_per_prompt=2, prompt_composition=True, regions=[[(0, 0, 0.5, 1), None], None],
                  eta=0.5, **FAST)
    recipes = result.recipes()
    assert [r.seed for r in recipes] == [7, 8, 9, 10]
    assert [r.prompt for r in recipes] == ["a red circle AND a blue square"] * 2 + ["a cat"] * 2
    assert [r.negative_prompt for r in recipes] == ["blurry", "blurry", "", ""]
    assert [r.regions for r in recipes][::2] == [[(0, 0, 0.5, 1), None], None]
    for f in fields_of(CALL):
        assert len({repr(getattr(r, f.name)) for r in recipes}) == 1, f.name
    assert recipes[0].eta == 0.5 and recipes[0].prompt_composition is True and recipes[0].num_inference_steps == 3


def test_reproduce_draws_the_same_pixels_from_the_settings_a_recipe_keeps(pipe):
    result = pipe("a red circle AND a blue square", seed=11, prompt_composition=True,
                  regions=[(0, 0, 0.5, 1), None], eta=0.3, **FAST)
    changed = pipe("a red circle AND a blue square", seed=11, prompt_composition=True, eta=0.3, **FAST)
    again = pipe.reproduce(result.recipes(), progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    assert not np.array_equal(np.asarray(changed.images[0]), np.asarray(result.images[0]))  # the regions mattered


def test_infotext_writes_and_reads_every_setting_that_has_a_key():
    inpainted = Recipe(prompt="a cat", num_inference_steps=12, guidance_scale=3.5, seed=9, strength=0.6, eta=0.25,
                       height=64, width=64, mask_blur=2, padding_mask_crop=16, masked_content="latent_noise")
    hires = Recipe(prompt="a cat", seed=9, hires_fix=True, hires_scale=1.5, hires_steps=8, hires_strength=0.4)
    keys = set()
    for recipe in (inpainted, hires):
        text = recipe.parameters()
        read = infotext.parse_parameters(text)
        for f in fields_of(infotext=True):
            if f"{meta(f.name).infotext}: " in text:
                keys.add(f.name)
                assert read[f.name] == getattr(recipe, f.name), f.name
    assert keys == {f.name for f in fields_of(infotext=True)}  # every key written by one recipe or the other
    assert infotext.parse_parameters(hires.parameters())["hires_strength"] == 0.4
    plain = Recipe(prompt="a cat", seed=1).parameters()
    assert "Eta" not in plain and "Denoising strength" not in plain  # written only when not their default
    assert "Mask blur" not in plain and "Masked content" not in plain and "Hires" not in plain


def test_the_generate_command_has_a_flag_per_setting_with_the_setting_default():
    parser = build_parser()
    args = parser.parse_args(["generate", "a cat", "--out", "x.png"])
    for f in fields_of(flag=True):  # a repeated flag (one value per ControlNet) is None until given
        repeated = meta(f.name).flag_options.get("action") == "append"
        assert getattr(args, f.name) == (None if repeated else f.default), f.name
    flags = ["generate", "a cat", "--out", "x.png", "--steps", "7", "--guidance", "2.5", "--seed", "4",
             "--num-images", "2", "--strength", "0.5", "--prompt-composition", "--clip-guidance", "0.2"]
    args = parser.parse_args(flags)
    assert (args.num_inference_steps, args.guidance_scale, args.seed, args.num_images_per_prompt, args.strength,
            args.prompt_composition, args.clip_guidance_scale) == (7, 2.5, 4, 2, 0.5, True, 0.2)


@pytest.mark.parametrize("name, value", [("num_inference_steps", 0), ("guidance_scale", -1.0), ("eta", 2.0),
                                         ("num_images_per_prompt", 0), ("strength", 0.0), ("output_type", "jpeg"),
                                         ("callback", 3), ("prompt_weighting", "yes")])
def test_each_setting_check_names_the_setting_and_runs_before_any_model(pipe, name, value):
    with pytest.raises((ValueError, TypeError), match=f"`{name}`: got"):
        meta(name).check(value)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
            pipe("a cat", **{**FAST, name: value})
    finally:
        handle.remove()
    assert calls == []


def test_the_stages_run_by_hand_draw_what_the_call_draws(pipe):
    whole = pipe("a red circle", seed=2, output_type="np", **FAST).images
    call = stages.resolve(pipe, GenerationSettings(prompt="a red circle", seed=2, output_type="np", **FAST))
    assert (call.settings.guidance_scale, call.settings.height, call.batch) == (7.5, 16, 1)
    contexts = stages.encode_text(pipe, call)
    start = stages.starting_latents(pipe, call)
    guidances = stages.guidances_for(pipe, call, contexts, start)
    final, steps = denoise(pipe.unet, start.scheduler, start.latents, start.timesteps, contexts.cond, guidances,
                           schedulers.step_kwargs(start.scheduler, call.generator, 0.0), progress=False)
    parts = stages.finish(pipe, call, final, start.scheduler, steps, guidances).images
    assert np.array_equal(whole, parts)


def test_resolve_fills_in_the_model_defaults_and_the_reference_size(pipe):
    pipe = LatentDiffusionPipeline(**pipe.components, defaults={"num_inference_steps": 6, "guidance_scale": 3.0})
    call = stages.resolve(pipe, GenerationSettings(prompt="a cat", image=PIL.Image.new("RGB", (24, 40))))
    s = call.settings
    assert (s.num_inference_steps, s.guidance_scale, s.height, s.width) == (6, 3.0, 40, 24)
    assert call.reference.size == (24, 40) and call.seeds is not None and len(call.seeds) == 1
    assert default("strength") == s.strength == 0.8
    assert {f.name for f in fields_of(IMAGE)} == {"prompt", "negative_prompt", "seed"}
    assert {f.name for f in fields_of(PROMPT)} == {"regions", "prompt_2", "negative_prompt_2"}  # SDXL: per prompt
    assert isinstance(call.generator, (torch.Generator, list))
