"""Our pixels equal diffusers' on the same components, scheduler config, seeds and arguments."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.sampling.schedulers import make_scheduler


def _reference(cls, components, scheduler):
    pipe = cls(**{**components, "scheduler": scheduler}, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uint8(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler_a", "dpm++", "dpm++_karras", "lms", "heun", "ddpm",
                                  "unipc", "lcm", "tcd"])
def test_text_to_image_matches_diffusers(components, name):
    scheduler = make_scheduler(name, components["scheduler"].config)
    ours = LatentDiffusionPipeline(**{**components, "scheduler": scheduler})
    theirs = _reference(StableDiffusionPipeline, components, make_scheduler(name, components["scheduler"].config))
    prompts = ["a red circle in the top left", "a photo of a cat"]
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, height=16, width=24)
    mine = ours(prompts, negative_prompt="blue", seed=11, progress=False, **kwargs).images
    generators = [torch.Generator().manual_seed(11 + i) for i in range(2)]
    reference = theirs(prompts, negative_prompt=["blue"] * 2, generator=generators, **kwargs).images
    assert np.abs(_uint8(mine) - _uint8(reference)).max() <= 1


def test_single_generator_matches_diffusers(components):
    ours = LatentDiffusionPipeline(**components)
    theirs = _reference(StableDiffusionPipeline, components, components["scheduler"])
    kwargs = dict(num_inference_steps=5, guidance_scale=3.0, height=16, width=16, num_images_per_prompt=3)
    mine = ours("a cat", generator=torch.Generator().manual_seed(4), progress=False, **kwargs).images
    reference = theirs("a cat", generator=torch.Generator().manual_seed(4), **kwargs).images
    assert np.abs(_uint8(mine) - _uint8(reference)).max() <= 1


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers: one reference for two images
@pytest.mark.parametrize("randomness", ["seeds", "generators", "one generator"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++", "lcm"])
def test_image_to_image_matches_diffusers(components, name, randomness):
    picture = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 24, 3) * 255).astype(np.uint8))
    ours = LatentDiffusionPipeline(**{**components, "scheduler": make_scheduler(name, components["scheduler"].config)})
    theirs = _reference(StableDiffusionImg2ImgPipeline, components,
                        make_scheduler(name, components["scheduler"].config))
    kwargs = dict(image=picture, strength=0.6, num_inference_steps=10, guidance_scale=4.0, num_images_per_prompt=2)

    def generators():
        if randomness == "one generator":
            return torch.Generator().manual_seed(7)
        return [torch.Generator().manual_seed(7 + i) for i in range(2)]

    if randomness == "seeds":
        mine = ours("a red circle", seed=7, progress=False, **kwargs)
    else:
        mine = ours("a red circle", generator=generators(), progress=False, **kwargs)
    reference = theirs("a red circle", generator=generators(), **kwargs).images
    assert mine.steps_run == 6
    assert np.abs(_uint8(mine.images) - _uint8(reference)).max() <= 1
