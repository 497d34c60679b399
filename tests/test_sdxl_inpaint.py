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


# -- the base -> refiner hand-off (denoising_end, then denoising_start with the base's latents) -----------------


def _hand_off(base_parts, refiner_parts, strength, original_image=None, **kwargs):
    """Ours and diffusers' base stop at 0.6 with latents, each refiner goes on from its own base's latents: the
    latents (ours, theirs) and the refiners' pixels (ours, theirs)."""
    refiner_config = dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    bases = LatentDiffusionXLPipeline(**base_parts), diffusers_pipe(StableDiffusionXLInpaintPipeline, base_parts)
    refiners = (LatentDiffusionXLPipeline(**refiner_parts, **refiner_config),
                diffusers_pipe(StableDiffusionXLInpaintPipeline, refiner_parts, **refiner_config))
    shared = dict(mask_image=_mask(), num_inference_steps=8, guidance_scale=5.0, height=HEIGHT, width=WIDTH, **kwargs)
    prompt, ours = "a red circle in the top left", dict(mask_blur=0, progress=False)
    latents = (bases[0](prompt, image=_picture(), strength=strength, denoising_end=0.6, output_type="latent", seed=3,
                        **ours, **shared).images,
               bases[1](prompt, image=_picture(), strength=strength, denoising_end=0.6, output_type="latent",
                        generator=seeds(3, 1), **shared).images)
    pixels = (refiners[0](prompt, image=latents[0], denoising_start=0.6, output_type="np", seed=5,
                          original_image=original_image, **ours, **shared).images,
              refiners[1](prompt, image=latents[1], denoising_start=0.6, output_type="np", generator=seeds(5, 1),
                          **shared).images)
    return latents, pixels


@pytest.mark.parametrize("unet", ["4 channels", "9 channels"])  # the base's; the refiner's has 4
@pytest.mark.parametrize("strength", [0.8, 1.0])
def test_the_inpainting_hand_off_draws_diffusers_pixels_and_gives_the_picture_back(base_parts, refiner_parts, unet,
                                                                                    strength):
    """diffusers' documented hand-off: the base stops at denoising_end with latents, whose known region it has
    put back clean at its last step; the refiner starts from them as they are and keeps re-noising that region.
    With original_image= the refiner pastes the picture back outside the mask, as one call does."""
    parts = _nine_channels(base_parts) if unet == "9 channels" else base_parts
    (mine, theirs), (painted, reference) = _hand_off(parts, refiner_parts, strength, original_image=_picture())
    assert torch.allclose(mine, theirs, atol=1e-4)
    inside = soft(_mask(), 0) >= 1.0
    close(painted[:, inside], reference[:, inside])
    original = np.asarray(_picture(), dtype=np.float32) / 255
    assert np.abs(painted[:, ~inside] - original[~inside]).max() <= 1e-6
    assert np.abs(reference[:, ~inside] - original[~inside]).max() > 1 / 255  # diffusers' drift through the VAE
    assert np.abs(painted[:, inside] - original[inside]).max() > 0.05


def test_without_the_original_picture_the_refiner_gives_diffusers_pixels_everywhere(base_parts, refiner_parts):
    """The refiner cannot give back a picture it was not given: outside the mask too its pixels are the decoded
    latents, diffusers' own."""
    _, (painted, reference) = _hand_off(base_parts, refiner_parts, 0.8)
    close(painted, reference)


def test_inpainting_stopped_at_denoising_end_draws_diffusers_pixels_inside_the_mask(base_parts):
    ours = LatentDiffusionXLPipeline(**base_parts)
    theirs = diffusers_pipe(StableDiffusionXLInpaintPipeline, base_parts)
    kwargs = dict(image=_picture(), mask_image=_mask(), strength=0.8, num_inference_steps=8, guidance_scale=5.0,
                  denoising_end=0.6, height=HEIGHT, width=WIDTH, output_type="np")
    output = ours("a cat", seed=2, mask_blur=0, progress=False, **kwargs)
    reference = theirs("a cat", generator=seeds(2, 1), **kwargs).images
    inside = soft(_mask(), 0) >= 1.0
    close(output.images[:, inside], reference[:, inside])
    assert output.steps_run == 2  # of the 6 that strength 0.8 runs, those at timesteps >= 400 (626 and 501)
    full = ours("a cat", seed=2, mask_blur=0, progress=False, **{**kwargs, "denoising_end": None}).images
    assert np.abs(full[:, inside] - output.images[:, inside]).max() > 1 / 255


def test_a_nine_channel_refiner_reads_the_masked_original_image(base_parts, refiner_parts):
    """A 9-channel UNet sees the masked picture's latents at every step; diffusers takes them ready-encoded as
    `masked_image_latents`, ours encodes `original_image` (drawing after the noise, as every 9-channel call does)."""
    refiner_config = dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    parts = _nine_channels(refiner_parts)
    ours = LatentDiffusionXLPipeline(**parts, **refiner_config)
    theirs = diffusers_pipe(StableDiffusionXLInpaintPipeline, parts, **refiner_config)
    latents = LatentDiffusionXLPipeline(**base_parts)("a cat", image=_picture(), mask_image=_mask(), seed=3,
                                                      denoising_end=0.6, output_type="latent", num_inference_steps=8,
                                                      progress=False).images
    kwargs = dict(image=latents, mask_image=_mask(), denoising_start=0.6, num_inference_steps=8, guidance_scale=5.0,
                  height=HEIGHT, width=WIDTH, output_type="np")
    mine = ours("a cat", seed=5, original_image=_picture(), mask_blur=0, progress=False, **kwargs).images
    generator = torch.Generator().manual_seed(5)
    torch.randn(latents.shape, generator=generator)  # the noise comes first
    pixels = theirs.image_processor.preprocess(_picture(), height=HEIGHT, width=WIDTH)
    keep = theirs.mask_processor.preprocess(_mask(), height=HEIGHT, width=WIDTH) < 0.5
    masked = theirs._encode_vae_image(pixels * keep, generator=generator)
    reference = theirs("a cat", generator=torch.Generator().manual_seed(5), masked_image_latents=masked,
                       **kwargs).images
    inside = soft(_mask(), 0) >= 1.0
    close(mine[:, inside], reference[:, inside])
    other = ours("a cat", seed=5, original_image=_picture(1), mask_blur=0, progress=False, **kwargs).images
    assert np.abs(other[:, inside] - mine[:, inside]).max() > 1 / 255  # the masked picture steers every step


LATENTS = dict(image=torch.ones(1, 4, HEIGHT // 2, WIDTH // 2), mask_image=_mask(), denoising_start=0.6)
PICTURE = dict(image=_picture(), mask_image=_mask())
OUTSIDE = r"`original_image`: given outside an inpainting hand-off"


@pytest.mark.parametrize("unet, arguments, message", [
    ("4", dict(LATENTS, denoising_start=None), r"`mask_image`: given with latents as `image` but no `denoising_start`"),
    ("4", dict(PICTURE, denoising_start=0.6), r"`denoising_start`: goes on from latents"),
    ("4", dict(PICTURE, original_image=_picture()), OUTSIDE),
    ("4", dict(LATENTS, mask_image=None, original_image=_picture()), OUTSIDE),
    ("4", dict(LATENTS, original_image=PIL.Image.new("RGB", (48, 32))),
     r"`mask_image`: 24x16, but `original_image` is 48x32"),
    ("4", dict(LATENTS, original_image="no/such/picture.png"), r"`original_image`: no file"),
    ("4", dict(LATENTS, masked_content="fill"), r"`masked_content`: got 'fill'; going on from latents"),
    ("4", dict(LATENTS, padding_mask_crop=4), r"`padding_mask_crop`: got 4; an inpainting hand-off"),
    ("4", dict(PICTURE, denoising_end=0.6, padding_mask_crop=4), r"`padding_mask_crop`: got 4; an inpainting hand-off"),
    ("9", LATENTS, r"`original_image`: got None; a 9-channel inpainting UNet"),
])
def test_bad_inpainting_hand_offs_are_refused_before_any_model_runs(base_parts, unet, arguments, message):
    parts = _nine_channels(base_parts) if unet == "9" else base_parts
    pipe = LatentDiffusionXLPipeline(**parts)

    def heavy(*args, **kwargs):
        raise AssertionError("a model ran before the call was checked")

    for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        model.forward = heavy
    pipe.vae.encode = pipe.vae.decode = heavy
    with pytest.raises(ValueError, match=message):
        pipe("a cat", height=HEIGHT, width=WIDTH, num_inference_steps=8, progress=False, **arguments)
