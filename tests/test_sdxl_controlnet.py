"""SDXL ControlNets: diffusers' SDXL ControlNet pixels (one net, two nets with an early end, guess mode,
image-to-image), a pipeline's own net in recipes, folders, the hires pass and nets made for other models."""

import copy

import numpy as np
import PIL.Image
import pytest
from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline
from test_controlnet import check_own_net_and_recipe, make_net, picture
from sdxl_components import close as _close, seeds as _seeds, theirs as _theirs

from ldm_pipeline import LatentDiffusionPipeline, LatentDiffusionXLPipeline
from ldm_pipeline.loading.controlnet import load_controlnet

FAST = dict(num_inference_steps=4, progress=False)


@pytest.fixture
def parts(_xl_parts):
    """The tiny SDXL base's components (a fresh copy each test)."""
    return copy.deepcopy(_xl_parts[0])


@pytest.fixture
def nets(parts):
    return [make_net(parts["unet"], 1), make_net(parts["unet"], 2)]


def _diffusers(cls, parts, nets):
    return _theirs(cls, copy.deepcopy(parts), controlnet=copy.deepcopy(nets))


def _differs(mine, plain) -> bool:
    return np.abs(np.asarray(mine, dtype=np.float64) - np.asarray(plain, dtype=np.float64)).max() > 0.03


@pytest.mark.parametrize("case", ["one net", "two nets, an early end", "guess mode"])
def test_text_to_image_with_sdxl_controlnets_draws_diffusers_pixels(parts, nets, case):
    ours = LatentDiffusionXLPipeline(**copy.deepcopy(parts))
    control = dict(controlnet=nets[0], control_image=picture(3), controlnet_conditioning_scale=0.7)
    if case == "two nets, an early end":
        control = dict(controlnet=nets, control_image=[picture(3), picture(4)],
                       controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.25],
                       control_guidance_end=[0.75, 1.0])
    if case == "guess mode":
        control.update(guess_mode=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, num_images_per_prompt=2, output_type="np",
                  negative_prompt="blurry")
    mine = ours("a red circle", seed=5, progress=False, **control, **kwargs).images
    theirs = _diffusers(StableDiffusionXLControlNetPipeline, parts, control.pop("controlnet"))
    reference = theirs("a red circle", image=control.pop("control_image"), generator=_seeds(5, 2), **control,
                       **kwargs).images
    assert mine.shape[1:3] == (16, 24)  # the control picture's size
    _close(mine, reference)
    plain = ours("a red circle", seed=5, progress=False, height=16, width=24, **kwargs).images
    assert _differs(mine, plain)  # the nets did something


def test_image_to_image_with_an_sdxl_controlnet_draws_diffusers_pixels(parts, nets):
    ours = LatentDiffusionXLPipeline(**copy.deepcopy(parts))
    # diffusers' SDXL ControlNet image-to-image defaults the scale to 0.8 (and strength to 0.8); ours is 1.0
    kwargs = dict(image=picture(6), control_image=picture(7), strength=0.6, num_inference_steps=5,
                  guidance_scale=3.0, controlnet_conditioning_scale=0.9, control_guidance_end=0.6, output_type="np")
    mine = ours("a cat", controlnet=nets[0], seed=2, progress=False, **kwargs).images
    theirs = _diffusers(StableDiffusionXLControlNetImg2ImgPipeline, parts, nets[0])
    reference = theirs("a cat", generator=_seeds(2, 1), **kwargs).images
    _close(mine, reference)
    kwargs.pop("control_image"), kwargs.pop("controlnet_conditioning_scale"), kwargs.pop("control_guidance_end")
    assert _differs(mine, ours("a cat", seed=2, progress=False, **kwargs).images)


def test_a_pipeline_built_with_an_sdxl_controlnet_uses_it_and_its_recipe_draws_it_again(parts, nets, tmp_path):
    image = check_own_net_and_recipe(
        lambda net: LatentDiffusionXLPipeline(**copy.deepcopy(parts), controlnet=net), nets, tmp_path)
    plain = LatentDiffusionXLPipeline(**copy.deepcopy(parts))("a cat", seed=1, height=16, width=24, **FAST)
    assert _differs(image, plain.images[0])


def test_an_sdxl_controlnet_folder_loads_and_the_command_line_draws_with_it_again(parts, nets, tmp_path):
    from ldm_pipeline.apps.cli import main

    nets[0].save_pretrained(tmp_path / "xl-edges")
    loaded = load_controlnet(tmp_path / "xl-edges")
    assert loaded.config.addition_embed_type == "text_time" and loaded.ldm_name == "xl-edges"
    pipe = LatentDiffusionXLPipeline(**copy.deepcopy(parts))
    drawn = [pipe("a cat", controlnet=net, control_image=picture(3), seed=1, **FAST).images[0]
             for net in (nets[0], loaded)]
    assert np.array_equal(*drawn)
    assert _differs(drawn[1], pipe("a cat", seed=1, height=16, width=24, **FAST).images[0])
    model, net = str(pipe.save_pretrained(tmp_path / "sdxl")), str(tmp_path / "xl-edges")
    picture(3).save(tmp_path / "edges.png")
    out, again = tmp_path / "cat.png", tmp_path / "again.png"
    assert main(["generate", "a cat", "--model", model, "--steps", "4", "--seed", "1", "--controlnet", net,
                 "--control-image", str(tmp_path / "edges.png"), "--out", str(out)]) == 0
    assert main(["generate", "--from", str(out), "--model", model, "--controlnet", net, "--out", str(again)]) == 0
    with PIL.Image.open(out) as first, PIL.Image.open(again) as second:
        first, second = np.asarray(first), np.asarray(second)
    assert np.array_equal(first, np.asarray(drawn[0])) and np.array_equal(first, second)


def test_the_hires_pass_takes_sdxl_controlnets_at_the_larger_size(parts, nets):
    """The net runs on the 16x24 picture with size ids (16, 24), then on the 32x48 one with (32, 48)."""
    pipe = LatentDiffusionXLPipeline(**copy.deepcopy(parts), controlnet=nets[0])
    seen = []
    forward = nets[0].forward

    def watched(sample, timestep, *args, controlnet_cond=None, added_cond_kwargs=None, **kwargs):
        seen.append((tuple(controlnet_cond.shape[-2:]), added_cond_kwargs["time_ids"][0].tolist()))
        return forward(sample, timestep, *args, controlnet_cond=controlnet_cond, added_cond_kwargs=added_cond_kwargs,
                       **kwargs)

    nets[0].forward = watched
    kwargs = dict(seed=0, hires_fix=True, hires_steps=4, output_type="np", **FAST)
    steered = pipe("a cat", control_image=picture(3), **kwargs).images
    assert dict(seen) == {(16, 24): [16, 24, 0, 0, 16, 24], (32, 48): [32, 48, 0, 0, 32, 48]}
    plain = LatentDiffusionXLPipeline(**copy.deepcopy(parts))("a cat", height=16, width=24, **kwargs).images
    assert steered.shape[1:3] == (32, 48) and _differs(steered, plain)


def test_inpainting_with_an_sdxl_controlnet_repaints_the_mask_only(parts, nets):
    pipe = LatentDiffusionXLPipeline(**copy.deepcopy(parts))
    mask = PIL.Image.new("L", (24, 16), 0)
    mask.paste(255, (12, 0, 24, 16))
    kwargs = dict(image=picture(6), mask_image=mask, mask_blur=0, seed=3, output_type="np", **FAST)
    steered = pipe("a cat", controlnet=nets[0], control_image=picture(7), **kwargs).images[0]
    plain = pipe("a cat", **kwargs).images[0]
    np.testing.assert_allclose(steered[:, :12], np.asarray(picture(6), dtype=np.float32)[:, :12] / 255, atol=1e-6)
    assert _differs(steered[:, 12:], plain[:, 12:])


def test_a_controlnet_made_for_another_kind_of_model_is_refused_naming_it(parts, nets, components):
    sd_net = make_net(components["unet"], 1)
    with pytest.raises(ValueError, match=r"`controlnet`: net 0 has cross_attention_dim=32 and this model's UNet 56"):
        LatentDiffusionXLPipeline(**copy.deepcopy(parts))("a cat", controlnet=sd_net, control_image=picture(3),
                                                               **FAST)
    with pytest.raises(ValueError, match=r"`controlnet`: net 1 has cross_attention_dim=56 and this model's UNet 32"):
        LatentDiffusionPipeline(**components)("a cat", controlnet=[sd_net, nets[0]],
                                              control_image=[picture(3), picture(4)], **FAST)
