"""The bundled shapes model: small, loadable offline by us and by diffusers, draws what it is asked, and draws
exactly the frozen pixels below."""

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


# Frozen pixels of the bundled model at its default settings (DDIM, 50 steps, guidance 4, 64x64), a tripwire for
# any change to the model, the loop, guidance or the scheduler setup. Image i is prompt i drawn from seed i; each
# row holds 9 pixels (RGB in [0, 1]) along a line through the image's first object, where its edges are the
# pixels most sensitive to a change (49 steps instead of 50, or guidance 4.2, moves them by 0.005 to 0.009).
# When the model or the loop changes on purpose, regenerate them with `python tests/test_bundled.py` and paste the
# array it prints here, saying why in the commit.
SLICE_PROMPTS = ["a red circle in the top left", "a small blue square in the center",
                 "a yellow triangle in the bottom right and a green circle in the top left"]
SLICE_LINES = [(16, slice(4, 29, 3)), (32, slice(20, 45, 3)), (48, slice(36, 61, 3))]  # (row, columns) per image
FROZEN_SLICES = np.array([
    [[0.5016, 0.5018, 0.5027], [0.5087, 0.4971, 0.4967], [0.8853, 0.1968, 0.1661], [0.8882, 0.1545, 0.1366],
     [0.8923, 0.1526, 0.1401], [0.8837, 0.1565, 0.1355], [0.8863, 0.1591, 0.1460], [0.8616, 0.1783, 0.1740],
     [0.5071, 0.4906, 0.4935]],
    [[0.5000, 0.5029, 0.5020], [0.5028, 0.5089, 0.5040], [0.0974, 0.3088, 0.8882], [0.1006, 0.3123, 0.8838],
     [0.0974, 0.3052, 0.8904], [0.0899, 0.2777, 0.8984], [0.5123, 0.5285, 0.4954], [0.5036, 0.5065, 0.4995],
     [0.5007, 0.5015, 0.5006]],
    [[0.4999, 0.5012, 0.5022], [0.4949, 0.5001, 0.4985], [0.6880, 0.6528, 0.3690], [0.9752, 0.8857, 0.1335],
     [0.9886, 0.8711, 0.1435], [0.9657, 0.8583, 0.1378], [0.5200, 0.5043, 0.4783], [0.4898, 0.4992, 0.5101],
     [0.4970, 0.5035, 0.5025]],
])


def bundled_slices() -> np.ndarray:
    pipe = LatentDiffusionPipeline.from_pretrained()
    images = pipe(SLICE_PROMPTS, seed=0, output_type="np", progress=False).images
    return np.stack([image[row, columns] for image, (row, columns) in zip(images, SLICE_LINES)])


def test_bundled_model_draws_the_frozen_pixels():
    slices = bundled_slices()
    assert np.abs(slices - FROZEN_SLICES).max() < 1e-3, np.array2string(slices, precision=4)


if __name__ == "__main__":  # regenerate FROZEN_SLICES (see above)
    print(np.array2string(bundled_slices(), precision=4, separator=", ", floatmode="fixed"))
