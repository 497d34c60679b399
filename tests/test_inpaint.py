"""Inpainting and outpainting: diffusers' pixels inside the mask, the user's own outside it."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from ldm_pipeline import LatentDiffusionPipeline, read_recipe
from ldm_pipeline.apps.cli import main
from ldm_pipeline.masks import crop_box, fill, load_mask, outpaint, soft
from ldm_pipeline.provenance import infotext
from ldm_pipeline.sampling.schedulers import make_scheduler

FAST = dict(num_inference_steps=4, progress=False)


def picture(width=24, height=16, seed=0):
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def corner_mask(width=24, height=16, box=(12, 6, 24, 16)):
    mask = PIL.Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture
def nine_channel(components):
    """The tiny components with a 9-channel inpainting UNet (latents, mask, masked image latents)."""
    config = dict(components["unet"].config)
    config["in_channels"] = 9
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(config).eval()
    return {**components, "unet": unet}


def _diffusers(components, scheduler_name="ddim"):
    scheduler = make_scheduler(scheduler_name, components["scheduler"].config)
    pipe = StableDiffusionInpaintPipeline(**{**copy.deepcopy(components), "scheduler": scheduler}, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inside(mask, blur):
    """Where the paste-back weight is 1: the result there is the drawn pixels alone."""
    return soft(mask, blur) >= 1.0


@pytest.mark.parametrize("unet", ["9 channels", "4 channels"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("scheduler, randomness", [("ddim", "seed"), ("euler", "seed"), ("ddim", "one generator")])
def test_inside_the_mask_the_pixels_are_diffusers(components, nine_channel, unet, strength, scheduler, randomness):
    """diffusers encodes the picture once, with the first generator, for a whole batch; here each image takes its
    own seed's sample (so an image is the same alone or in a batch): they agree image by image, and on a batch
    drawn from one generator."""
    parts = nine_channel if unet == "9 channels" else components
    ours = LatentDiffusionPipeline(**{**copy.deepcopy(parts), "scheduler": make_scheduler(
        scheduler, parts["scheduler"].config)})
    image, mask = picture(), corner_mask()
    count = 1 if randomness == "seed" else 2
    kwargs = dict(image=image, mask_image=mask, strength=strength, num_inference_steps=6, guidance_scale=4.0,
                  num_images_per_prompt=count, height=16, width=24)
    if randomness == "seed":
        mine = ours("a red circle", seed=3, mask_blur=1, progress=False, **kwargs).images
        generator = [torch.Generator().manual_seed(3)]
    else:
        mine = ours("a red circle", generator=torch.Generator().manual_seed(3), mask_blur=1, progress=False,
                    **kwargs).images
        generator = torch.Generator().manual_seed(3)
    reference = _diffusers(parts, scheduler)("a red circle", generator=generator, **kwargs).images
    inside = _inside(mask, 1)
    assert inside.sum() >= 40
    assert np.abs(pixels(mine) - pixels(reference))[:, inside].max() <= 1
    outside = soft(mask, 1) == 0
    assert np.array_equal(pixels(mine)[:, outside], np.repeat(pixels([image])[:, outside], count, axis=0))
    assert np.abs(pixels(reference) - pixels([image]))[:, outside].max() > 1  # diffusers' own pixels drift there


@pytest.mark.parametrize("blur", [0, 2])
@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_outside_the_mask_and_its_band_the_picture_comes_back_exactly(pipe, blur, output_type):
    image, mask = picture(seed=4), corner_mask(box=(4, 2, 14, 12))
    result = pipe("a cat", image=image, mask_image=mask, mask_blur=blur, seed=0, output_type=output_type, **FAST)
    drawn = result.images
    array = pixels(drawn) if output_type == "pil" else (
        np.asarray(drawn) if output_type == "np" else drawn.permute(0, 2, 3, 1).numpy()) * 255
    keep = soft(mask, blur) == 0
    assert np.abs(np.asarray(array, dtype=np.float32)[0][keep] - np.asarray(image, dtype=np.float32)[keep]).max() \
        <= (0 if output_type == "pil" else 1e-3)
    assert np.abs(np.asarray(array, dtype=np.float32)[0][~keep] - np.asarray(image, dtype=np.float32)[~keep]).max() > 8
    if blur:  # the band: some weights strictly between 0 and 1, outside the binary mask too
        weights = soft(mask, blur)
        assert ((weights > 0) & (weights < 1) & (np.asarray(mask) == 0)).any()


def test_a_four_channel_unet_keeps_the_known_latents_at_every_step(pipe):
    image, mask = picture(seed=5), corner_mask()
    seen = []
    pipe("a cat", image=image, mask_image=mask, strength=1.0, mask_blur=0, seed=1,
         callback=lambda step, t, latents: seen.append(latents.clone()), **FAST)
    keep = torch.from_numpy(np.asarray(mask) < 128)[::2, ::2]  # the tiny VAE's factor is 2
    final, first = seen[-1][0, :, keep], seen[0][0, :, keep]
    assert not torch.allclose(first, final)  # noised to the next timestep, then clean at the end
    call = pipe("a cat", image=image, mask_image=mask, strength=1.0, mask_blur=0, seed=1, output_type="latent", **FAST)
    assert torch.equal(call.images[0, :, keep], final)


def test_padding_mask_crop_draws_the_crop_at_full_size_and_pastes_it_back(pipe):
    image, mask = picture(48, 32, seed=6), corner_mask(48, 32, box=(30, 4, 38, 12))
    box = crop_box(mask, 4, 16 / 16)
    assert box == (26, 0, 42, 16)
    seen = []
    result = pipe("a cat", image=image, mask_image=mask, padding_mask_crop=4, mask_blur=0, seed=2,
                  callback=lambda step, t, latents: seen.append(latents.shape), **FAST)
    assert result.images[0].size == (48, 32)
    assert seen[0][-2:] == (8, 8)  # the model's own size (16 px), not the picture's
    drawn, original = pixels(result.images)[0], pixels([image])[0]
    outside = np.ones((32, 48), bool)
    outside[4:12, 30:38] = False
    assert np.array_equal(drawn[outside], original[outside])
    assert np.abs(drawn[4:12, 30:38] - original[4:12, 30:38]).max() > 8
    recipe = result.recipes()[0]
    assert (recipe.padding_mask_crop, recipe.height, recipe.width) == (4, 16, 16)
    assert "Inpaint area: Only masked" in recipe.parameters() and "Masked area padding: 4" in recipe.parameters()


def test_masked_content_changes_only_what_the_masked_area_starts_from(pipe):
    image, mask = picture(seed=7), corner_mask()
    drawn = {content: pixels(pipe("a cat", image=image, mask_image=mask, masked_content=content, strength=0.6,
                                  mask_blur=0, seed=0, **FAST).images)[0]
             for content in ("original", "fill", "latent_noise", "latent_nothing")}
    keep = np.asarray(mask) == 0
    for content, result in drawn.items():
        assert np.array_equal(result[keep], pixels([image])[0][keep]), content
    values = list(drawn.values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])


def test_the_recipe_keeps_the_mask_and_reproduce_draws_the_same_pixels(pipe, tmp_path):
    image, mask = picture(seed=8), corner_mask()
    image.save(tmp_path / "picture.png")
    mask.save(tmp_path / "mask.png")
    result = pipe("a cat", image=str(tmp_path / "picture.png"), mask_image=str(tmp_path / "mask.png"), seed=5,
                  mask_blur=2, masked_content="fill", **FAST)
    path = result.save(tmp_path / "out.png")[0]
    recipe = read_recipe(path)
    assert recipe.mask_path == str(tmp_path / "mask.png") and len(recipe.mask_hash) == 64
    assert (recipe.mask_blur, recipe.masked_content, recipe.padding_mask_crop) == (2, "fill", None)
    again = pipe.reproduce(path, progress=False)
    assert np.array_equal(pixels(again.images), pixels(result.images))
    other = corner_mask(box=(0, 0, 8, 8))
    with pytest.raises(ValueError, match="`mask_image`: this mask is not the one"):
        pipe.reproduce(path, mask_image=other, progress=False)
    plain = pipe("a cat", seed=5, **FAST).recipes()[0]
    assert (plain.mask_hash, plain.mask_blur, plain.masked_content) == (None, None, None)
    assert "Mask blur" not in plain.parameters()


def test_infotext_carries_the_inpaint_fields_a1111_writes():
    text = ("a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.75, "
            "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise")
    fields = infotext.parse_parameters(text)
    assert (fields["mask_blur"], fields["padding_mask_crop"], fields["masked_content"]) == (4, 32, "latent_noise")


def test_mask_inputs_are_read_alike(pipe):
    grey = corner_mask()
    as_array = np.asarray(grey)
    rgba = PIL.Image.new("RGBA", grey.size, (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (12, 6, 24, 16))  # a brush layer: white strokes, transparent elsewhere
    half_grey = grey.point(lambda v: 140 if v else 100)  # grey levels: binarised at 50 %
    for given in (grey, as_array, as_array / 255.0, torch.from_numpy(as_array / 255.0), grey.convert("RGB"), rgba,
                  half_grey):
        assert load_mask(given, (24, 16)).tobytes() == grey.tobytes(), type(given)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(mask_image=corner_mask()), ValueError, r"`mask_image`: given without `image`"),
    (dict(image=picture(), mask_image=corner_mask(16, 16)), ValueError, r"`mask_image`: 16x16, but `image` is 24x16"),
    (dict(image=picture(), mask_image=PIL.Image.new("L", (24, 16), 100)), ValueError,
     r"`mask_image`: no pixel is white"),
    (dict(image=picture(), mask_image="no/such/mask.png"), ValueError, r"`mask_image`: no file at"),
    (dict(image=picture(), mask_image=3), TypeError, r"`mask_image`: got int"),
    (dict(image=picture(), mask_image=np.zeros((16, 24, 2))), ValueError, r"`mask_image`: array of shape"),
    (dict(image=picture(), mask_image=corner_mask(), mask_blur=-1), ValueError, r"`mask_blur`: got -1"),
    (dict(image=picture(), mask_image=corner_mask(), padding_mask_crop=2.5), ValueError, r"`padding_mask_crop`"),
    (dict(image=picture(), mask_image=corner_mask(), masked_content="noise"), ValueError, r"`masked_content`: got"),
])
def test_bad_masks_are_refused_before_any_model_runs(pipe, arguments, error, message):
    calls = []
    handle = pipe.vae.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            pipe("a cat", **arguments, **FAST)
    finally:
        handle.remove()
    assert calls == []


def test_a_full_mask_repaints_everything_and_an_inpainting_unet_needs_a_mask(pipe, nine_channel):
    image = picture(seed=9)
    full = PIL.Image.new("L", image.size, 255)
    result = pixels(pipe("a cat", image=image, mask_image=full, seed=0, **FAST).images)[0]
    assert (np.abs(result - pixels([image])[0]).max(axis=-1) > 0).mean() > 0.9
    inpainting = LatentDiffusionPipeline(**nine_channel)
    with pytest.raises(ValueError, match=r"`mask_image`: this model's UNet is an inpainting UNet"):
        inpainting("a cat", **FAST)


def test_outpaint_extends_the_canvas_with_the_edge_colours_and_masks_the_new_area():
    image = PIL.Image.new("RGB", (20, 16), (200, 40, 40))
    canvas, mask = outpaint(image, left=4, right=10)
    assert canvas.size == mask.size == (40, 16)  # 34 wide, rounded up to a multiple of 8 on the right
    mask_array, canvas_array = np.asarray(mask), np.asarray(canvas)
    assert (mask_array[:, 4:24] == 0).all() and (mask_array[:, :4] == 255).all() and (mask_array[:, 24:] == 255).all()
    assert (np.abs(canvas_array.astype(int) - (200, 40, 40)).max() <= 1)  # the new area continues the colour
    with pytest.raises(ValueError, match=r"`left`: got -1"):
        outpaint(image, left=-1)
    with pytest.raises(ValueError, match=r"all 0"):
        outpaint(image)


def test_fill_takes_the_colours_around_the_hole():
    image = PIL.Image.new("RGB", (16, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 16))
    hole = PIL.Image.new("L", (16, 16), 0)
    hole.paste(255, (6, 6, 10, 10))
    filled = np.asarray(fill(image, hole)).astype(int)
    assert filled[8, 6, 0] > filled[8, 9, 0] and filled[8, 9, 2] > filled[8, 6, 2]  # red side left, blue right
    assert np.array_equal(filled[np.asarray(hole) == 0], np.asarray(image)[np.asarray(hole) == 0])


def test_ldm_generate_inpaints_and_outpaints(model, tmp_path):
    picture(seed=10).save(tmp_path / "in.png")
    corner_mask().save(tmp_path / "mask.png")
    common = ["--model", str(model), "--steps", "3", "--seed", "0"]
    assert main(["generate", "a cat", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--mask-blur", "1", "--masked-content", "fill", *common, "--out", str(tmp_path / "out.png")]) == 0
    recipe = read_recipe(tmp_path / "out.png")
    assert (recipe.mask_blur, recipe.masked_content, recipe.mask_path) == (1, "fill", str(tmp_path / "mask.png"))
    assert main(["generate", "a cat", "--image", str(tmp_path / "in.png"), "--outpaint", "0,0,8,0", *common,
                 "--out", str(tmp_path / "wide.png")]) == 0
    assert PIL.Image.open(tmp_path / "wide.png").size == (32, 16)
    assert main(["generate", "--from", str(tmp_path / "out.png"), "--model", str(model),
                 "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels([PIL.Image.open(tmp_path / "again.png")]), pixels([PIL.Image.open(tmp_path / "out.png")]))
    assert main(["generate", "a cat", "--mask", str(tmp_path / "mask.png"), *common,
                 "--out", str(tmp_path / "x.png")]) == 2
