"""ControlNet: diffusers' pixels with one net, several, early ends, guess mode, image-to-image and inpainting."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline,
                       StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPipeline)

from ldm_pipeline import LatentDiffusionPipeline, read_recipe

FAST = dict(num_inference_steps=4, progress=False)


def make_net(unet, seed):
    """A ControlNet copied from the UNet, its zero convolutions given random weights so that it does something."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.3)
    return net


def picture(seed, width=24, height=16):
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def _diffusers(cls, components, nets):
    pipe = cls(**copy.deepcopy(components), controlnet=copy.deepcopy(nets), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def nets(components):
    return [make_net(components["unet"], 1), make_net(components["unet"], 2)]


@pytest.mark.parametrize("case", ["one net", "scale and early end", "two nets", "guess mode", "one generator"])
def test_text_to_image_with_controlnets_draws_diffusers_pixels(components, nets, case):
    ours = LatentDiffusionPipeline(**copy.deepcopy(components))
    control = dict(controlnet=nets[0], control_image=picture(3))
    if case == "scale and early end":
        control.update(controlnet_conditioning_scale=0.6, control_guidance_start=0.25, control_guidance_end=0.5)
    if case == "two nets":
        control = dict(controlnet=nets, control_image=[picture(3), picture(4)], controlnet_conditioning_scale=[1.0, 0.5],
                       control_guidance_end=[1.0, 0.5])
    if case == "guess mode":
        control.update(guess_mode=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, num_images_per_prompt=2)
    if case == "one generator":
        mine = ours("a red circle", generator=torch.Generator().manual_seed(5), progress=False, **control,
                    **kwargs).images
        generator = torch.Generator().manual_seed(5)
    else:
        mine = ours("a red circle", seed=5, progress=False, **control, **kwargs).images
        generator = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    theirs = _diffusers(StableDiffusionControlNetPipeline, components, control.pop("controlnet"))
    reference = theirs("a red circle", image=control.pop("control_image"), generator=generator, **control,
                       **kwargs).images
    assert mine[0].size == (24, 16)  # the control picture's size
    assert np.abs(pixels(mine) - pixels(reference)).max() <= 1
    plain = ours("a red circle", seed=5, progress=False, height=16, width=24, **kwargs).images
    assert np.abs(pixels(mine) - pixels(plain)).max() > 8  # the nets did something


def test_image_to_image_and_inpainting_with_a_controlnet_draw_diffusers_pixels(components, nets):
    ours = LatentDiffusionPipeline(**copy.deepcopy(components))
    # diffusers' ControlNet image-to-image and inpainting pipelines default the scale to 0.8 and 0.5; ours is 1
    kwargs = dict(image=picture(6), control_image=picture(7), strength=0.7, num_inference_steps=5,
                  guidance_scale=3.0, controlnet_conditioning_scale=0.8)
    mine = ours("a cat", controlnet=nets[0], seed=2, progress=False, **kwargs).images
    theirs = _diffusers(StableDiffusionControlNetImg2ImgPipeline, components, nets[0])
    reference = theirs("a cat", generator=[torch.Generator().manual_seed(2)], **kwargs).images
    assert np.abs(pixels(mine) - pixels(reference)).max() <= 1

    mask = PIL.Image.new("L", (24, 16), 0)
    mask.paste(255, (12, 4, 24, 16))
    kwargs.update(mask_image=mask, height=16, width=24)
    mine = ours("a cat", controlnet=nets[0], seed=2, mask_blur=0, progress=False, **kwargs).images
    theirs = _diffusers(StableDiffusionControlNetInpaintPipeline, components, nets[0])
    reference = theirs("a cat", generator=[torch.Generator().manual_seed(2)], **kwargs).images
    inside = np.asarray(mask) == 255
    assert np.abs(pixels(mine) - pixels(reference))[:, inside].max() <= 1
    assert np.array_equal(pixels(mine)[:, ~inside], pixels([kwargs["image"]])[:, ~inside])


def check_own_net_and_recipe(build, nets, tmp_path):
    """A pipeline built with a net (`build(net)`) draws what a call given that net draws; the recipe records the
    net and draws the image again; a pipeline with another net refuses it. Returns the image."""
    pipe = build(nets[0])
    picture(3).save(tmp_path / "edges.png")
    result = pipe("a cat", control_image=str(tmp_path / "edges.png"), seed=1, controlnet_conditioning_scale=0.8,
                  **FAST)
    given = build(None)("a cat", controlnet=nets[0], seed=1, control_image=picture(3),
                        controlnet_conditioning_scale=0.8, **FAST)
    assert np.array_equal(pixels(result.images), pixels(given.images))
    path = result.save(tmp_path / "out.png")[0]
    recipe = read_recipe(path)
    (unit,) = recipe.controlnets
    assert (unit["scale"], unit["start"], unit["end"], len(unit["digest"])) == (0.8, 0.0, 1.0, 32)
    assert unit["image_path"] == str(tmp_path / "edges.png")
    assert "ControlNet 0: " in recipe.parameters() and "Weight: 0.8" in recipe.parameters()
    again = pipe.reproduce(path, progress=False)
    assert np.array_equal(pixels(again.images), pixels(result.images))
    with pytest.raises(ValueError, match=r"`controlnet`: the image was drawn with ControlNet weights"):
        build(nets[1]).reproduce(path, progress=False)
    return result.images[0]


def test_a_pipeline_built_with_a_controlnet_uses_it_and_the_recipe_records_it(components, nets, tmp_path):
    check_own_net_and_recipe(
        lambda net: LatentDiffusionPipeline(**copy.deepcopy(components), controlnet=net), nets, tmp_path)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(control_image=picture(1)), ValueError, r"`control_image`: given without a ControlNet"),
    (dict(controlnet="nets"), TypeError, r"`controlnet`: got str; expected a diffusers ControlNetModel"),
    (dict(control_image=None), ValueError, r"`control_image`: a ControlNet needs its picture"),
    (dict(control_image=[picture(1), picture(2)]), ValueError, r"`control_image`: 2 pictures for 1 ControlNets"),
    (dict(controlnet_conditioning_scale=[1.0, 2.0]), ValueError, r"`controlnet_conditioning_scale`: 2 values for 1"),
    (dict(control_guidance_start=0.6, control_guidance_end=0.5), ValueError, r"`control_guidance_start`, `control"),
    (dict(guess_mode="yes"), TypeError, r"`guess_mode`: got 'yes'"),
    (dict(control_image="no/such.png"), ValueError, r"`control_image`: no file at"),
])
def test_bad_controlnet_arguments_are_refused_before_any_model_runs(components, nets, arguments, error, message):
    pipe = LatentDiffusionPipeline(**copy.deepcopy(components))
    given = dict(controlnet=nets[0], control_image=picture(1))
    given.update(arguments)
    if "controlnet" not in arguments and "control_image" in arguments and len(arguments) == 1 \
            and message.startswith("`control_image`: given without"):
        given.pop("controlnet")
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(error, match=message):
        pipe("a cat", **given, **FAST)
    handle.remove()
    assert calls == []


def test_controlnets_load_from_a_folder_and_from_an_original_single_file(components, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from ldm_pipeline.loading.controlnet import load_controlnet
    from ldm_pipeline.loading.folders import ModelFileError, ModelNotFoundError
    from ldm_format import controlnet_to_ldm

    net = make_net(components["unet"], 3)
    net.save_pretrained(tmp_path / "edges")
    loaded = load_controlnet(tmp_path / "edges")
    assert loaded.ldm_name == "edges"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())

    wide = ControlNetModel.from_unet(components["unet"]).eval()  # the usual hint-block widths, as files have them
    save_file(controlnet_to_ldm(wide), tmp_path / "control_tiny.safetensors")
    wide.save_config(tmp_path / "config")
    single = load_controlnet(tmp_path / "control_tiny.safetensors", config=tmp_path / "config")
    assert single.ldm_name == "control_tiny.safetensors"
    assert all(torch.equal(single.state_dict()[k], v) for k, v in wide.state_dict().items())
    with pytest.raises(ModelFileError, match=r"holds no ControlNet cross-attention weights"):
        save_file({"control_model.time_embed.0.weight": torch.zeros(2, 2)}, tmp_path / "bare.safetensors")
        load_controlnet(tmp_path / "bare.safetensors")

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match=r"cannot download 'someone/controlnet-canny'"):
        load_controlnet("someone/controlnet-canny")


def test_canny_and_scribble_make_white_lines_on_black():
    from ldm_pipeline.conditioning.preprocess import canny, scribble

    square = PIL.Image.new("RGB", (32, 32), "grey")
    square.paste((200, 40, 40), (8, 8, 24, 24))
    edges = np.asarray(canny(square))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    outline = edges[..., 0] == 255
    assert outline[8:24, 7:9].any() and outline[8:24, 23:25].any() and not outline[12:20, 12:20].any()
    drawing = PIL.Image.new("RGB", (32, 32), "white")
    drawing.paste((0, 0, 0), (4, 10, 28, 12))
    strokes = np.asarray(scribble(drawing))[..., 0]
    assert (strokes[10:12, 4:28] == 255).all() and strokes.sum() == 255 * 2 * 24
    with pytest.raises(ValueError, match=r"`low`, `high`: got 200, 100"):
        canny(square, 200, 100)


def test_ldm_generate_with_a_controlnet(components, nets, tmp_path):
    from ldm_pipeline.apps.cli import main

    LatentDiffusionPipeline(**copy.deepcopy(components)).save_pretrained(tmp_path / "model")
    nets[0].save_pretrained(tmp_path / "net")
    picture(3).save(tmp_path / "photo.png")
    common = ["--model", str(tmp_path / "model"), "--steps", "3", "--seed", "0", "--controlnet", str(tmp_path / "net")]
    assert main(["generate", "a cat", *common, "--control-image", str(tmp_path / "photo.png"), "--control-scale",
                 "0.7", "--control-preprocess", "canny", "--out", str(tmp_path / "out.png")]) == 0
    recipe = read_recipe(tmp_path / "out.png")
    (unit,) = recipe.controlnets
    assert (unit["name"], unit["scale"], unit["image_path"]) == ("net", 0.7, str(tmp_path / "out-control0.png"))
    assert PIL.Image.open(tmp_path / "out-control0.png").size == (24, 16)
    assert main(["generate", "--from", str(tmp_path / "out.png"), "--model", str(tmp_path / "model"), "--controlnet",
                 str(tmp_path / "net"), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels([PIL.Image.open(tmp_path / "again.png")]),
                          pixels([PIL.Image.open(tmp_path / "out.png")]))
    assert main(["generate", "a cat", *common, "--out", str(tmp_path / "x.png")]) == 2  # no control picture


def test_a_nets_digest_is_kept_until_its_weights_change(components):
    from ldm_pipeline.conditioning.controlnet import digest

    net = make_net(components["unet"], 4)
    first = digest(net)
    assert digest(net) == first and net._ldm_digest[1] == first
    with torch.no_grad():
        net.controlnet_mid_block.weight.add_(1.0)  # in place: the fingerprint notices
    assert digest(net) != first
