"""Guidance as one interface in the loop: classifier-free, CLIP guidance, and a third kind."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.evaluation.clip import Clip
from ldm_pipeline.guidance.clip import ClipGuidance, image_features
from ldm_pipeline.guidance.base import Guidance
from ldm_pipeline.sampling.loop import StepState, prediction_from_x0, x0_from_prediction
from tests.conftest import SD_SCHEDULER

FAST = dict(num_inference_steps=4, height=16, width=16, progress=False, output_type="np")


@pytest.fixture(scope="module")
def clip():
    return Clip.from_pretrained()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_and_x0_are_inverse(kind):
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for a in (0.05, 0.5, 0.95):
        x0 = x0_from_prediction(sample, output, a, kind)
        torch.testing.assert_close(prediction_from_x0(sample, x0, a, kind), output, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x0_from_prediction(sample, output, 0.5, kind), sample)


def test_clip_guidance_off_draws_the_same_pixels(pipe, components):
    """Off (the default, or 0) draws diffusers' pixels: a reference that has no CLIP guidance to turn on."""
    reference = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, height=16, width=16, guidance_scale=pipe.defaults["guidance_scale"])
    theirs = reference("a red circle", generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images
    plain = pipe("a red circle", seed=3, **FAST).images
    assert np.abs(plain - theirs).max() < 1e-3  # equal on the CPU; CLIP guidance at 0.05 moves it by 0.03
    assert np.array_equal(pipe("a red circle", seed=3, clip_guidance_scale=0, **FAST).images, plain)


def test_clip_guidance_raises_the_clip_similarity_of_the_predicted_image(pipe, clip):
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    features = clip.text_embeddings(prompts)

    def similarity(scale):
        images = pipe(prompts, seed=0, clip_guidance_scale=scale, clip_model=clip, **FAST).images
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            seen = image_features(clip, pixels)
        return torch.nn.functional.cosine_similarity(seen, features).mean().item(), images

    base, plain = similarity(0)
    guided, steered = similarity(2.0)
    assert np.isfinite(steered).all() and np.abs(steered - plain).max() > 0.01
    assert guided > base + 0.01, (base, guided)


def test_clip_guidance_adds_no_unet_work_and_combines_with_classifier_free(pipe, clip, monkeypatch):
    batches = []
    forward = pipe.unet.forward

    def counted(sample, timestep, encoder_hidden_states, **kwargs):
        batches.append(sample.shape[0])
        return forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counted)
    guided = pipe("a red circle", seed=1, guidance_scale=4, clip_guidance_scale=1, clip_model=clip, **FAST)
    assert batches == [2] * 4  # [uncond, cond] once per step, as without CLIP guidance
    plain = pipe("a red circle", seed=1, guidance_scale=4, **FAST)
    assert np.abs(guided.images - plain.images).max() > 0.01


def test_clip_guidance_every_k_steps_leaves_the_other_steps_alone(pipe, clip, monkeypatch):
    calls = []
    original = ClipGuidance.__call__

    def spy(self, prediction, outputs, state):
        result = original(self, prediction, outputs, state)
        calls.append((state.step, not torch.equal(result, prediction)))
        return result

    monkeypatch.setattr(ClipGuidance, "__call__", spy)
    pipe("a red circle", seed=1, clip_guidance_scale=1, clip_guidance_every=2, clip_model=clip, **FAST)
    assert calls == [(0, True), (1, False), (2, True), (3, False)]


def test_clip_guidance_works_with_a_sigma_scheduler(components, clip):
    components["scheduler"] = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                                        if k not in ("clip_sample", "set_alpha_to_one")})
    pipe = LatentDiffusionPipeline(**components)
    plain = pipe("a blue square", seed=2, **FAST).images
    guided = pipe("a blue square", seed=2, clip_guidance_scale=0.5, clip_model=clip, **FAST).images
    assert np.isfinite(guided).all() and 0.001 < np.abs(guided - plain).mean() < 0.5


class TowardsZero(Guidance):
    """A third kind, for the test: pull x_0 a share of the way towards zero latents."""

    def __init__(self, share):
        self.share, self.seen = share, []

    def __call__(self, prediction, outputs, state: StepState):
        self.seen.append(state.step)
        return state.prediction_for(state.denoised(prediction) * (1 - self.share)).to(prediction.dtype)


def test_a_new_guidance_needs_only_the_interface(pipe):
    from ldm_pipeline.sampling.loop import denoise
    from ldm_pipeline.sampling.schedulers import fresh_copy

    cond = pipe.encode_prompt(["a cat"])
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(guidances):
        scheduler = fresh_copy(pipe.scheduler)
        scheduler.set_timesteps(5)
        return denoise(pipe.unet, scheduler, start, scheduler.timesteps, cond, guidances, progress=False)[0]

    shrink = TowardsZero(0.5)
    plain, shrunk = run([]), run([shrink])
    assert shrink.seen == [0, 1, 2, 3, 4]
    assert shrunk.abs().mean() < 0.8 * plain.abs().mean()
    assert torch.allclose(run([TowardsZero(0.0)]), plain, atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clip_guidance_scale=-1), ValueError, "clip_guidance_scale.*-1"),
    (dict(clip_guidance_scale=float("nan")), ValueError, "clip_guidance_scale"),
    (dict(clip_guidance_scale="1"), TypeError, "clip_guidance_scale"),
    (dict(clip_guidance_scale=1, clip_guidance_every=0), ValueError, "clip_guidance_every.*0"),
    (dict(clip_guidance_scale=1, clip_model=3), TypeError, "clip_model.*int"),
])
def test_bad_clip_guidance_arguments_are_refused_up_front(pipe, kwargs, error, match, monkeypatch):
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    with pytest.raises(error, match=match):
        pipe("a red circle", **kwargs, **FAST)


def test_clip_guidance_needs_prompt_text(pipe):
    embeds = pipe.encode_prompt(["a red circle"])
    with pytest.raises(ValueError, match="clip_guidance_scale.*prompt"):
        pipe(prompt_embeds=embeds, clip_guidance_scale=1, **FAST)


def test_a_clip_guided_image_carries_its_guidance_and_is_drawn_again(pipe, clip, tmp_path):
    from ldm_pipeline import read_recipe

    kwargs = {**FAST, "output_type": "pil"}
    output = pipe("a red circle", seed=5, clip_guidance_scale=0.7, clip_guidance_every=2, **kwargs)
    path = output.save(tmp_path / "guided.png")[0]
    recipe = read_recipe(path)
    assert (recipe.clip_guidance_scale, recipe.clip_guidance_every) == (0.7, 2)
    assert recipe.clip_model == clip.name and recipe.clip_model.startswith("shapes_clip@")
    again = pipe.reproduce(path, progress=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(output.images[0]))
    plain = pipe("a red circle", seed=5, **kwargs).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(output.images[0]))
