"""The bundled shapes model: small, loadable offline by us and by diffusers, and it draws what it is asked."""

import numpy as np
from diffusers import StableDiffusionPipeline

from ldm_pipeline import DEFAULT_MODEL, LatentDiffusionPipeline
from ldm_pipeline.evaluation.judge import judge


def test_bundled_model_is_small_and_complete():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    assert (DEFAULT_MODEL / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_bundled_model_loads_with_no_argument_and_draws_the_prompt():
    pipe = LatentDiffusionPipeline.from_pretrained()
    assert pipe.defaults["guidance_scale"] != 7.5  # the model carries its own tuned default
    prompts = ["a red circle in the center", "a large blue square in the top left"]
    result = pipe(prompts, seed=0, num_inference_steps=20, progress=False)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    verdicts = [judge(image, prompt) for image, prompt in zip(result.images, prompts)]
    assert all(v.colour and v.shape for v in verdicts), verdicts


def test_diffusers_loads_the_bundled_model():
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle in the center", num_inference_steps=5, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
