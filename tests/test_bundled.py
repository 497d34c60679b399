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
    [[0.5003, 0.5018, 0.5028], [0.5054, 0.5097, 0.5103], [0.8772, 0.1277, 0.1212], [0.8718, 0.1481, 0.1624],
     [0.8688, 0.1510, 0.1586], [0.8623, 0.1537, 0.1537], [0.8686, 0.1376, 0.1503], [0.8536, 0.1403, 0.1376],
     [0.5018, 0.5061, 0.4985]],
    [[0.5042, 0.5110, 0.5049], [0.5058, 0.5418, 0.4954], [0.1637, 0.2926, 0.8902], [0.1521, 0.2947, 0.8651],
     [0.1441, 0.3090, 0.8770], [0.1082, 0.3330, 0.9011], [0.5125, 0.5021, 0.4796], [0.5067, 0.5013, 0.4986],
     [0.5028, 0.5021, 0.5018]],
    [[0.5054, 0.5008, 0.4997], [0.5044, 0.5003, 0.5047], [0.6142, 0.6011, 0.4083], [0.9346, 0.8188, 0.1597],
     [0.9352, 0.8267, 0.1529], [0.9194, 0.7959, 0.1162], [0.4948, 0.4846, 0.4865], [0.4978, 0.5016, 0.5036],
     [0.5011, 0.4994, 0.5033]],
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
