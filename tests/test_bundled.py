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
    [[0.5028, 0.5011, 0.5022], [0.5015, 0.4999, 0.5121], [0.8804, 0.1593, 0.1592], [0.8765, 0.1403, 0.1433],
     [0.8838, 0.1395, 0.1441], [0.8785, 0.1466, 0.1386], [0.8823, 0.1531, 0.1468], [0.8615, 0.1702, 0.1722],
     [0.5045, 0.4944, 0.4979]],
    [[0.5029, 0.5026, 0.5008], [0.4976, 0.5043, 0.5005], [0.3903, 0.4479, 0.5938], [0.1180, 0.3134, 0.8890],
     [0.1013, 0.3089, 0.8852], [0.1144, 0.2953, 0.8854], [0.1773, 0.3364, 0.8464], [0.5014, 0.5111, 0.4917],
     [0.5011, 0.5048, 0.5018]],
    [[0.5005, 0.5010, 0.5010], [0.4951, 0.4988, 0.4981], [0.5837, 0.5806, 0.4402], [0.9654, 0.8732, 0.1420],
     [0.9757, 0.8618, 0.1529], [0.9623, 0.8574, 0.1408], [0.5067, 0.5078, 0.4964], [0.4887, 0.4956, 0.5104],
     [0.4953, 0.5040, 0.5018]],
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
