"""SDXL inpainting: diffusers' `StableDiffusionXLInpaintPipeline` pixels inside the mask, the picture outside it."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from sdxl_components import close, seeds, theirs as diffusers_pipe

from ldm_pipeline import LatentDiffusionXLPipeline
from ldm_pipeline.masks import soft

HEIGHT, WIDTH = 16, 24


def _picture(seed=0):
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(HEIGHT, WIDTH, 3) * 255).astype(np.uint8))


def _mask(box=(12, 6, 24, 16)):
    mask = PIL.Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, box)
    return mask


def _nine_channels(parts):
    """The tiny base with a 9-channel inpainting UNet (latents, mask, masked picture's latents)."""
    config = dict(parts["unet"].config)
    config["in_channels"] = 9
    torch.manual_seed(1)
    return {**parts, "unet": UNet2DConditionModel.from_config(config).eval()}


@pytest.mark.parametrize("unet", ["4 channels", "9 channels"])
@pytest.mark.parametrize("strength", [0.8, 1.0])
@pytest.mark.parametrize("randomness", ["seed", "one generator"])
def test_inside_the_mask_the_pixels_are_diffusers(base_parts, unet, strength, randomness):
    """mask_blur=0 pastes through the binary mask, as diffusers' pipeline uses it; outside the mask our picture
    is the user's own, where diffusers' drifts through the VAE. diffusers encodes the picture once, with the first
    generator, for a whole batch; here each image takes its own seed's posterior sample (so an image is the same
    alone or in a batch): they agree image by image, and on a batch drawn from one generator."""
    parts = _nine_channels(base_parts) if unet == "9 channels" else base_parts
    ours = LatentDiffusionXLPipeline(**parts)
    theirs = diffusers_pipe(StableDiffusionXLInpaintPipeline, parts)
    image, mask = _picture(), _mask()
    count = 1 if randomness == "seed" else 2
    kwargs = dict(image=image, mask_image=mask, strength=strength, num_inference_steps=6, guidance_scale=5.0,
                  num_images_per_prompt=count, height=HEIGHT, width=WIDTH, output_type="np")
    if randomness == "seed":
        mine = ours("a red circle in the top left", seed=3, mask_blur=0, progress=False, **kwargs).images
        generator = seeds(3, 1)
    else:
        mine = ours("a red circle in the top left", generator=torch.Generator().manual_seed(3), mask_blur=0,
                    progress=False, **kwargs).images
        generator = torch.Generator().manual_seed(3)
    reference = theirs("a red circle in the top left", generator=generator, **kwargs).images
    inside = soft(mask, 0) >= 1.0
    assert inside.sum() >= 100
    close(mine[:, inside], reference[:, inside])
    outside = ~inside
    original = np.asarray(image, dtype=np.float32) / 255
    assert np.abs(mine[:, outside] - original[outside]).max() <= 1e-6
    assert np.abs(reference[:, outside] - original[outside]).max() > 1 / 255  # diffusers' own pixels drift there
    assert np.abs(mine[:, inside] - original[inside]).max() > 0.05  # the masked part is drawn anew


def test_a_batch_of_seeds_takes_one_posterior_sample_per_image(base_parts):
    """The deliberate difference: with one generator per image, diffusers encodes the picture with the first
    one for the whole batch, so its second image differs from that seed drawn alone; ours does not."""
    ours = LatentDiffusionXLPipeline(**base_parts)
    theirs = diffusers_pipe(StableDiffusionXLInpaintPipeline, base_parts)
    kwargs = dict(image=_picture(), mask_image=_mask(), strength=0.8, num_inference_steps=4, guidance_scale=5.0,
                  height=HEIGHT, width=WIDTH, output_type="np")
    prompts = ["a red circle in the top left", "a photo of a cat"]
    batch = ours(prompts, seed=3, mask_blur=0, progress=False, **kwargs).images
    alone = ours(prompts[1], seed=4, mask_blur=0, progress=False, **kwargs).images
    close(batch[1], alone[0])  # batched arithmetic: not bit for bit
    inside = soft(_mask(), 0) >= 1.0
    close(alone[:, inside], theirs(prompts[1], generator=seeds(4, 1), **kwargs).images[:, inside])
    their_batch = theirs(prompts, generator=seeds(3, 2), **kwargs).images
    close(batch[0][inside], their_batch[0][inside])
    assert np.abs(batch[1][inside] - their_batch[1][inside]).max() > 1 / 255


def test_a_refiner_inpaints_with_its_aesthetic_scores_as_diffusers(refiner_parts):
    config = dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    ours = LatentDiffusionXLPipeline(**refiner_parts, **config)
    theirs = diffusers_pipe(StableDiffusionXLInpaintPipeline, refiner_parts, **config)
    image, mask = _picture(1), _mask((0, 0, 12, 10))
    kwargs = dict(image=image, mask_image=mask, strength=0.7, num_inference_steps=5, guidance_scale=4.0,
                  height=HEIGHT, width=WIDTH, output_type="np", aesthetic_score=7.0, negative_aesthetic_score=2.0)
    mine = ours("a cat", seed=6, mask_blur=0, progress=False, **kwargs).images
    reference = theirs("a cat", generator=seeds(6, 1), **kwargs).images
    inside = soft(mask, 0) >= 1.0
    close(mine[:, inside], reference[:, inside])
