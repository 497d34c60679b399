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
    [[0.5007, 0.5007, 0.5043], [0.4977, 0.4953, 0.5092], [0.8805, 0.1723, 0.1586], [0.8866, 0.1444, 0.1359],
     [0.8913, 0.1372, 0.1365], [0.8886, 0.1526, 0.1319], [0.8842, 0.1618, 0.1474], [0.8588, 0.1863, 0.1701],
     [0.5046, 0.4871, 0.4952]],
    [[0.5020, 0.5024, 0.5012], [0.4995, 0.5083, 0.4950], [0.3135, 0.4132, 0.6761], [0.1013, 0.3149, 0.8928],
     [0.0877, 0.3054, 0.8994], [0.0954, 0.2812, 0.9072], [0.3474, 0.4265, 0.6691], [0.5122, 0.5115, 0.4948],
     [0.4999, 0.5043, 0.5020]],
    [[0.5004, 0.5013, 0.5024], [0.4958, 0.5006, 0.4986], [0.6866, 0.6493, 0.3734], [0.9710, 0.8797, 0.1335],
     [0.9862, 0.8636, 0.1411], [0.9705, 0.8630, 0.1245], [0.5127, 0.5097, 0.4934], [0.4923, 0.4980, 0.5096],
     [0.4972, 0.5041, 0.5021]],
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
