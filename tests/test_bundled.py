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
    [[0.5031, 0.5012, 0.5007], [0.5039, 0.5000, 0.5085], [0.8782, 0.1523, 0.1574], [0.8765, 0.1450, 0.1462],
     [0.8825, 0.1426, 0.1467], [0.8765, 0.1452, 0.1455], [0.8776, 0.1571, 0.1503], [0.8604, 0.1711, 0.1692],
     [0.5048, 0.5012, 0.4956]],
    [[0.5035, 0.5020, 0.4993], [0.5015, 0.5025, 0.5039], [0.3796, 0.4414, 0.5996], [0.1188, 0.3067, 0.8931],
     [0.1064, 0.3078, 0.8838], [0.1121, 0.2968, 0.8843], [0.1634, 0.3317, 0.8534], [0.4982, 0.5127, 0.4918],
     [0.5004, 0.5034, 0.5022]],
    [[0.5004, 0.5010, 0.5016], [0.4975, 0.4986, 0.4987], [0.5889, 0.5848, 0.4336], [0.9668, 0.8644, 0.1434],
     [0.9772, 0.8563, 0.1511], [0.9643, 0.8507, 0.1377], [0.5098, 0.5073, 0.4930], [0.4913, 0.4968, 0.5091],
     [0.4967, 0.5030, 0.5022]],
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
