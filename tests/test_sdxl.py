"""SDXL: tiny random SDXL-shaped components (a base and a refiner) draw diffusers' SDXL pixels."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from sdxl_components import close, seeds, theirs as diffusers_pipe

from ldm_pipeline import LatentDiffusionPipeline, LatentDiffusionXLPipeline

FAST = dict(num_inference_steps=4, progress=False)


# -- text-to-image -------------------------------------------------------------------------------


def test_text_to_image_draws_diffusers_pixels(base, base_parts):
    theirs = diffusers_pipe(StableDiffusionXLPipeline, base_parts)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=24, output_type="np")
    prompts = ["a red circle in the top left", "a photo of a cat"]
    mine = base(prompts, seed=3, progress=False, **kwargs).images
    reference = theirs(prompts, generator=seeds(3, 2), **kwargs).images
    close(mine, reference)


def test_a_different_seed_or_prompt_2_draws_other_pixels(base):
    kwargs = dict(height=16, width=16, output_type="np", **FAST)
    first = base("a red circle", seed=1, **kwargs).images
    assert np.abs(first - base("a red circle", seed=2, **kwargs).images).max() > 0.05
    assert np.abs(first - base("a red circle", prompt_2="a blue square", seed=1, **kwargs).images).max() > 0.01


@pytest.mark.parametrize("case", ["negative", "prompt_2", "no_force_zeros", "sizes", "crops", "one_generator"])
def test_text_to_image_settings_draw_diffusers_pixels(base_parts, case):
    config = dict(force_zeros_for_empty_prompt=case != "no_force_zeros")
    ours = LatentDiffusionXLPipeline(**base_parts, **config)
    theirs = diffusers_pipe(StableDiffusionXLPipeline, base_parts, **config)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, height=16, width=16, output_type="np")
    prompts = ["a red circle in the top left", "a small blue square in the center"]
    extra = {
        "negative": dict(negative_prompt=["blurry", "a photo of a cat"]),
        "prompt_2": dict(prompt_2=["a painting of a house by the sea", "an orange triangle"],
                         negative_prompt=["blurry", "green"], negative_prompt_2=["a cat", "red"]),
        "no_force_zeros": {},
        # diffusers repeats [negative, positive] time ids per image, so one prompt keeps its copies in order
        "sizes": dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 32),
                      negative_original_size=(8, 8), negative_crops_coords_top_left=(0, 0),
                      negative_target_size=(24, 16)),
        "crops": dict(crops_coords_top_left=(4, 8)),  # the negative copy takes the prompt's sizes and crops
        "one_generator": dict(num_images_per_prompt=2),
    }[case]
    if case == "sizes":
        prompts = prompts[:1]
    if case == "one_generator":
        mine = ours(prompts, generator=torch.Generator().manual_seed(5), progress=False, **kwargs, **extra).images
        reference = theirs(prompts, generator=torch.Generator().manual_seed(5), **kwargs, **extra).images
    else:
        mine = ours(prompts, seed=5, progress=False, **kwargs, **extra).images
        reference = theirs(prompts, generator=seeds(5, len(prompts)), **kwargs, **extra).images
    close(mine, reference)


def test_clip_skip_reads_an_earlier_layer_on_both_sides(base, base_parts):
    theirs = diffusers_pipe(StableDiffusionXLPipeline, base_parts)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=16, output_type="np")
    plain = base("a red circle", seed=2, progress=False, **kwargs).images
    mine = base("a red circle", seed=2, clip_skip=1, progress=False, **kwargs).images
    reference = theirs("a red circle", generator=seeds(2, 1), clip_skip=1, **kwargs).images
    close(mine, reference)  # the empty negative prompt is zeros, so both sides agree with diffusers
    assert np.abs(mine - plain).max() > 0.01
    # a negative prompt is read from the same earlier layer (diffusers reads it from the penultimate one)
    context, pooled = base.encode_prompt("blurry", clip_skip=1)
    their_context, *_ = theirs.encode_prompt("blurry", device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    assert torch.allclose(context, their_context, atol=1e-6)
    negative = base("a red circle", negative_prompt="blurry", seed=2, clip_skip=1, progress=False, **kwargs).images
    given = base(prompt_embeds=base.encode_prompt("a red circle", clip_skip=1)[0],
                 pooled_prompt_embeds=base.encode_prompt("a red circle", clip_skip=1)[1],
                 negative_prompt_embeds=context, negative_pooled_prompt_embeds=pooled, seed=2, progress=False,
                 **kwargs).images
    close(negative, given)


# -- image-to-image and the refiner ----------------------------------------------------------------


def _picture(height=16, width=24):
    return PIL.Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("model", ["base", "refiner"])
def test_image_to_image_draws_diffusers_pixels(base_parts, refiner_parts, model):
    parts, config = (base_parts, {}) if model == "base" else (
        refiner_parts, dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False))
    ours = LatentDiffusionXLPipeline(**parts, **config)
    theirs = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, parts, **config)
    kwargs = dict(image=_picture(), strength=0.6, num_inference_steps=6, guidance_scale=4.0, output_type="np",
                  num_images_per_prompt=2, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    prompt = "a red circle in the top left"
    mine = ours(prompt, negative_prompt="blurry", seed=9, progress=False, **kwargs).images
    reference = theirs(prompt, negative_prompt="blurry", generator=seeds(9, 2), **kwargs).images
    close(mine, reference)


def test_base_hands_off_to_the_refiner_as_diffusers_does(base, refiner, base_parts, refiner_parts):
    their_base = diffusers_pipe(StableDiffusionXLPipeline, base_parts)
    their_refiner = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, refiner_parts, requires_aesthetics_score=True,
                            force_zeros_for_empty_prompt=False)
    prompts = ["a red circle in the top left", "a photo of a cat"]
    shared = dict(num_inference_steps=10, guidance_scale=5.0)
    latents = base(prompts, seed=4, denoising_end=0.7, output_type="latent", height=16, width=16, progress=False,
                   **shared).images
    their_latents = their_base(prompts, generator=seeds(4, 2), denoising_end=0.7, output_type="latent", height=16,
                               width=16, **shared).images
    assert torch.allclose(latents, their_latents, atol=1e-5)
    assert base(prompts, seed=4, denoising_end=0.7, output_type="latent", height=16, width=16, progress=False,
                **shared).steps_run == 7
    mine = refiner(prompts, seed=4, image=latents, denoising_start=0.7, output_type="np", progress=False,
                   **shared).images
    reference = their_refiner(prompts, generator=seeds(4, 2), image=their_latents, denoising_start=0.7,
                              output_type="np", **shared).images
    close(mine, reference)
    output = refiner(prompts, seed=4, image=latents, denoising_start=0.7, progress=False, **shared)
    assert output.steps_run == 3 and output.recipes()[0].not_reproducible  # latents are not in the recipe


# -- folders, recipes, errors --------------------------------------------------------------------------


def test_sdxl_folders_round_trip_offline_and_load_as_diffusers_writes_them(base, refiner, base_parts, refiner_parts,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = dict(height=16, width=16, output_type="np", seed=6, **FAST)
    for ours, theirs_cls, parts, config, name in (
            (base, StableDiffusionXLPipeline, base_parts, {}, "base"),
            (refiner, StableDiffusionXLImg2ImgPipeline, refiner_parts,
             dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False), "refiner")):
        call = dict(kwargs, image=_picture(16, 16), strength=0.5) if name == "refiner" else kwargs
        drawn = ours("a red circle", **call).images
        saved = ours.save_pretrained(tmp_path / name)
        loaded = LatentDiffusionPipeline.from_pretrained(saved)  # the base class finds the SDXL sibling
        assert type(loaded) is LatentDiffusionXLPipeline and loaded.is_refiner == (name == "refiner")
        assert loaded.settings == ours.settings
        # the same weights, bit for bit; a weight read in place from the file may sit at another memory alignment,
        # which changes a matrix product's rounding in the last bit
        np.testing.assert_allclose(loaded("a red circle", **call).images, drawn, atol=1e-5, rtol=0)
        assert loaded.model_hash() == ours.model_hash()
        reread = theirs_cls.from_pretrained(saved)  # diffusers reads our folder ...
        assert reread.config.get("requires_aesthetics_score", False) == (name == "refiner")
        # ... and we read its
        diffusers_pipe(theirs_cls, parts, **config).save_pretrained(tmp_path / f"diffusers-{name}")
        from_diffusers = LatentDiffusionPipeline.from_pretrained(tmp_path / f"diffusers-{name}")
        assert from_diffusers.settings == ours.settings
        np.testing.assert_allclose(from_diffusers("a red circle", **call).images, drawn, atol=1e-5, rtol=0)


def test_recipes_keep_the_sdxl_settings_and_reproduce_draws_the_same_pixels(base, tmp_path):
    output = base(["a red circle", "a cat"], prompt_2=["a blue square", None], negative_prompt="blurry",
                  negative_prompt_2="green", seed=8, clip_skip=1, original_size=(32, 32),
                  crops_coords_top_left=(2, 4), height=16, width=16, **FAST)
    recipes = output.recipes()
    assert [r.prompt_2 for r in recipes] == ["a blue square", None]
    assert [r.negative_prompt_2 for r in recipes] == ["green", "green"]
    assert (recipes[0].clip_skip, recipes[0].original_size, recipes[0].crops_coords_top_left) == (1, (32, 32), (2, 4))
    assert recipes[0].guidance_scale == 5.0  # SDXL's default
    for path, first in zip(output.save(tmp_path / "drawn"), output.images):  # each image alone, from its PNG
        again = base.reproduce(path, progress=False)
        np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(first))


def test_the_refiner_reproduces_its_image_to_image(refiner, tmp_path):
    output = refiner("a cat", image=_picture(16, 16), strength=0.5, aesthetic_score=8.0, seed=2, **FAST)
    assert output.recipes()[0].aesthetic_score == 8.0
    again = refiner.reproduce(output.recipes(), image=_picture(16, 16), progress=False)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(output.images[0]))


def test_a_one_tower_model_refuses_the_sdxl_settings_and_takes_clip_skip(pipe):
    for name, value in (("prompt_2", "a cat"), ("original_size", (32, 32)), ("aesthetic_score", 7.0)):
        with pytest.raises(ValueError, match=f"`{name}`: this model has one text encoder"):
            pipe("a red circle", **{name: value}, **FAST)
    skipped = pipe("a red circle", seed=1, clip_skip=1, output_type="np", **FAST).images
    plain = pipe("a red circle", seed=1, output_type="np", **FAST).images
    assert np.abs(skipped - plain).max() > 0.01
    hidden = pipe.text_encoder(pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids,
                               output_hidden_states=True).hidden_states[-2]
    np.testing.assert_allclose(pipe.encode_prompt("a red circle", clip_skip=1),
                               pipe.text_encoder.final_layer_norm(hidden).detach(), atol=1e-6)


def test_the_hires_fix_conditions_its_pass_on_the_larger_size(base):
    """Base pass at 16x24 with size ids (16, 24); the hires pass at 32x48 with (32, 48); the recipe draws it again."""
    seen = []
    forward = base.unet.forward

    def watched(sample, timestep, *args, added_cond_kwargs=None, **kwargs):
        seen.append((tuple(sample.shape[-2:]), added_cond_kwargs["time_ids"][0].tolist()))
        return forward(sample, timestep, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    base.unet.forward = watched
    try:
        output = base("a red circle", seed=2, height=16, width=24, hires_fix=True, hires_steps=4, **FAST)
    finally:
        base.unet.forward = forward
    assert output.images[0].size == (48, 32)
    factor = base.vae_scale_factor
    ids = {shape: ids for shape, ids in seen}
    assert ids == {(16 // factor, 24 // factor): [16, 24, 0, 0, 16, 24],
                   (32 // factor, 48 // factor): [32, 48, 0, 0, 32, 48]}
    again = base.reproduce(output.recipes()[0], progress=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(output.images[0]))


@pytest.mark.parametrize("arguments, message", [
    (dict(denoising_start=0.5), "`denoising_start`: goes on from latents"),
    (dict(denoising_end=0.001), "leaves no step to run"),
    (dict(clip_skip=5), "`clip_skip`"),
    (dict(prompt_2=["a", "b"]), "`prompt_2`"),
    (dict(hires_fix=True, denoising_end=0.5), "`denoising_end`: .* does not go with hires_fix"),
    (dict(prompt_embeds=torch.zeros(1, 77, 56)), "`pooled_prompt_embeds`"),
])
def test_bad_sdxl_calls_are_refused_with_the_setting_named(base, arguments, message):
    prompt = None if "prompt_embeds" in arguments else "a cat"
    with pytest.raises(ValueError, match=message):
        base(prompt, height=16, width=16, **arguments, **FAST)


def test_an_fp16_vae_with_force_upcast_decodes_in_fp32(base):
    latents = base("a cat", seed=1, height=16, width=16, output_type="latent", **FAST).images
    from ldm_pipeline.runtime.guards import decode_checked

    full = decode_checked(base.vae, latents)
    base.vae.to(torch.float16)
    upcast = decode_checked(base.vae, latents.half(), upcast=True)
    assert upcast.dtype == torch.float32 and base.vae.dtype == torch.float16
    torch.testing.assert_close(upcast, full, atol=2e-3, rtol=0)


# -- original single files ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_original_single_files_load_offline_with_the_shipped_tokenizers(base, refiner, model, tmp_path, monkeypatch):
    import json
    import shutil
    import socket

    from safetensors.torch import save_file

    from ldm_format import to_sdxl_state_dict
    from ldm_pipeline.loading import single_file
    from ldm_pipeline.loading.single_file import config_dir
    from ldm_pipeline.loading.single_file_xl import guess_xl_config

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # this checkout's configs/ (an editable install of another checkout maps ldm_pipeline.configs there)
    monkeypatch.setattr(single_file, "config_root", lambda: Path(__file__).resolve().parents[1] / "configs")
    ours = base if model == "base" else refiner
    checkpoint = tmp_path / f"tiny-{model}.safetensors"
    save_file(to_sdxl_state_dict(ours.unet, ours.vae, ours.text_encoder, ours.text_encoder_2), checkpoint)
    name = "sdxl" if model == "base" else "sdxl_refiner"
    assert guess_xl_config(checkpoint, {k: () for k in __import__("safetensors").safe_open(
        checkpoint, "pt").keys()}) == name
    configs = ours.save_pretrained(tmp_path / "configs")  # the tiny architecture's configs, the shipped tokenizers'
    for folder in ("tokenizer", "tokenizer_2"):
        if (configs / folder).is_dir():
            shutil.rmtree(configs / folder)
            (configs / folder).mkdir()
            shutil.copy(config_dir(name) / folder / "tokenizer_config.json", configs / folder)
    loaded = LatentDiffusionXLPipeline.from_single_file(checkpoint, config=str(configs))
    assert loaded.is_refiner == (model == "refiner") and loaded.settings == ours.settings
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(ours, part), getattr(loaded, part)
        if mine is None:
            assert theirs is None
            continue
        state = theirs.state_dict()
        for key, value in mine.state_dict().items():
            assert torch.equal(state[key], value), (part, key)
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer_2("a photo of a cat").input_ids == [
        49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.identity.name == f"tiny-{model}"
    index = json.loads((config_dir(name) / "model_index.json").read_text())
    assert index.get("requires_aesthetics_score", False) == (model == "refiner")


def test_the_command_line_draws_with_an_sdxl_folder_and_draws_it_again(base, tmp_path, capsys):
    from ldm_pipeline.apps.cli import main

    model = base.save_pretrained(tmp_path / "sdxl")
    out, again = tmp_path / "cat.png", tmp_path / "again.png"
    assert main(["generate", "a cat", "--model", str(model), "--steps", "3", "--seed", "5", "--size", "16x16",
                 "--clip-skip", "1", "--out", str(out)]) == 0
    assert main(["generate", "--from", str(out), "--model", str(model), "--out", str(again)]) == 0
    with PIL.Image.open(out) as first, PIL.Image.open(again) as second:
        assert np.array_equal(np.asarray(first), np.asarray(second))


def test_long_weighted_and_composed_prompts_and_inpainting_run_on_sdxl(base):
    kwargs = dict(height=16, width=16, output_type="np", seed=3, **FAST)
    plain = base("a red circle", **kwargs).images
    long = base("a red circle " + "in the top left " * 30, **kwargs)  # 120+ tokens: two windows in both towers
    assert long.images.shape == plain.shape
    weighted = base("a (red:1.5) circle", prompt_weighting=True, **kwargs).images
    composed = base("a red circle AND a blue square", prompt_composition=True, **kwargs).images
    assert np.abs(weighted - plain).max() > 0.001 and np.abs(composed - plain).max() > 0.001
    mask = PIL.Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    painted = base("a red circle", image=_picture(16, 16), mask_image=mask, mask_blur=0, **kwargs).images[0]
    kept = np.asarray(_picture(16, 16), dtype=np.float32)[:, 8:] / 255
    np.testing.assert_allclose(painted[:, 8:], kept, atol=1e-6)  # outside the mask: the picture itself


def test_clip_skip_is_a1111s_clip_skip_less_one_in_the_infotext():
    from ldm_pipeline import Recipe
    from ldm_pipeline.provenance import infotext

    text = Recipe(prompt="a cat", seed=1, clip_skip=1).parameters()
    assert "Clip skip: 2" in text and infotext.parse_parameters(text)["clip_skip"] == 1
    plain = Recipe(prompt="a cat", seed=1).parameters()
    assert "Clip skip" not in plain and "clip_skip" not in infotext.parse_parameters(plain)
    assert "clip_skip" not in infotext.parse_parameters(plain.replace("Seed: 1", "Seed: 1, Clip skip: 1"))


def test_the_one_tower_class_refuses_an_sdxl_unet_before_it_runs(base_parts):
    parts = {k: v for k, v in base_parts.items() if k not in ("tokenizer_2", "text_encoder_2")}
    with pytest.raises(ValueError, match="use LatentDiffusionXLPipeline"):
        LatentDiffusionPipeline(**parts)("a cat", **FAST)
