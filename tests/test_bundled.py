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


def test_the_stored_default_is_four_ddim_steps_and_draws_the_prompts():
    """The stored default, measured on 200 prompts per kind against 50 steps (docs/results/eval-steps4-g2.5-ddim.md):
    no kind worse by the paired comparison."""
    pipe = LatentDiffusionPipeline.from_pretrained()
    assert (pipe.defaults["num_inference_steps"], pipe.defaults["guidance_scale"]) == (4, 2.5)
    prompts = ["a red circle in the top left", "a small blue square in the center",
               "a yellow triangle in the bottom right and a green circle in the top left"]
    result = pipe(prompts, seed=0, progress=False)
    assert result.steps_run == 4 and result.scheduler == "ddim"
    verdicts = [judge(image, prompt) for image, prompt in zip(result.images, prompts)]
    assert all(v.correct for v in verdicts), verdicts


def test_diffusers_loads_the_bundled_model():
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle in the center", num_inference_steps=5, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


# Frozen pixels of the bundled model at DDIM, 50 steps, guidance 2.5, 64x64 (its default before the stored 4 steps,
# kept at 50 where an edge is most sensitive to the loop), a tripwire for
# any change to the model, the loop, guidance or the scheduler setup. Image i is prompt i drawn from seed i; each
# row holds 9 pixels (RGB in [0, 1]) along a line through the image's first object, where its edges are the
# pixels most sensitive to a change (49 steps instead of 50, or guidance 0.2 higher, moves them by 0.005 to 0.009).
# When the model or the loop changes on purpose, regenerate them with `python tests/test_bundled.py` and paste the
# array it prints here, saying why in the commit.
SLICE_PROMPTS = ["a red circle in the top left", "a small blue square in the center",
                 "a yellow triangle in the bottom right and a green circle in the top left"]
SLICE_LINES = [(16, slice(4, 29, 3)), (32, slice(20, 45, 3)), (48, slice(36, 61, 3))]  # (row, columns) per image
FROZEN_SLICES = np.array([
    [[0.5027, 0.5015, 0.5016], [0.5037, 0.4997, 0.5054], [0.8719, 0.1695, 0.1651], [0.8728, 0.1498, 0.1484],
     [0.8789, 0.1455, 0.1488], [0.8732, 0.1489, 0.1476], [0.8746, 0.1592, 0.1523], [0.8604, 0.1703, 0.1687],
     [0.5037, 0.5012, 0.4964]],
    [[0.5036, 0.5020, 0.4994], [0.5013, 0.5022, 0.5032], [0.3848, 0.4415, 0.5978], [0.1295, 0.3092, 0.8846],
     [0.1171, 0.3099, 0.8771], [0.1218, 0.2999, 0.8787], [0.1656, 0.3300, 0.8583], [0.4982, 0.5117, 0.4926],
     [0.5005, 0.5034, 0.5024]],
    [[0.5012, 0.5010, 0.5012], [0.4979, 0.4988, 0.4990], [0.5703, 0.5708, 0.4455], [0.9548, 0.8536, 0.1471],
     [0.9604, 0.8432, 0.1567], [0.9517, 0.8387, 0.1472], [0.5012, 0.5052, 0.5012], [0.4974, 0.4988, 0.5073],
     [0.4986, 0.5033, 0.5024]],
])


def bundled_slices() -> np.ndarray:
    pipe = LatentDiffusionPipeline.from_pretrained()
    images = pipe(SLICE_PROMPTS, seed=0, num_inference_steps=50, output_type="np", progress=False).images
    return np.stack([image[row, columns] for image, (row, columns) in zip(images, SLICE_LINES)])


def test_bundled_model_draws_the_frozen_pixels():
    slices = bundled_slices()
    assert np.abs(slices - FROZEN_SLICES).max() < 1e-3, np.array2string(slices, precision=4)


if __name__ == "__main__":  # regenerate FROZEN_SLICES (see above)
    print(np.array2string(bundled_slices(), precision=4, separator=", ", floatmode="fixed"))


def test_the_shipped_lcm_lora_draws_in_one_step_and_diffusers_draws_the_same_pixels():
    """Fast mode on the bundled model: its LCM-LoRA at its stored 2 steps (and at 1), guidance 1, draws the
    prompts, and diffusers' own LCM path (LCMScheduler + load_lora_weights of the shipped folder) draws the same
    pixels."""
    import copy

    import torch
    from diffusers import LCMScheduler

    pipe = LatentDiffusionPipeline.from_pretrained()
    components = copy.deepcopy(pipe.components)
    pipe.enable_fast()
    assert (pipe.defaults["num_inference_steps"], pipe.defaults["guidance_scale"]) == (2, 1.0)
    prompts = ["a red circle in the top left", "a small blue square in the center",
               "a yellow triangle in the bottom right and a green circle in the top left"]
    assert all(judge(image, prompt).correct for image, prompt in zip(pipe(prompts, seed=0, progress=False).images,
                                                                     prompts))
    result = pipe(prompts, seed=0, num_inference_steps=1, progress=False)
    assert result.steps_run == 1 and result.scheduler == "lcm" and result.recipes()[0].fast
    verdicts = [judge(image, prompt) for image, prompt in zip(result.images, prompts)]
    assert all(v.correct for v in verdicts), verdicts

    theirs = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(pipe.defaults["fast_lora"])
    theirs.set_progress_bar_config(disable=True)
    reference = theirs(prompts, generator=[torch.Generator().manual_seed(i) for i in range(3)],
                       num_inference_steps=1, guidance_scale=1.0).images
    for mine, their in zip(result.images, reference):
        assert np.abs(np.asarray(mine, dtype=int) - np.asarray(their, dtype=int)).max() <= 1
