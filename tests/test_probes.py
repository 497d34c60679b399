"""Probes: they record what the UNet does without changing it, and what they record is right."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention

from conftest import SD_SCHEDULER
from ldm_pipeline.sampling import probes

PROMPT = "a red circle in the top left"


def _cross_attention_layers(unet):
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def test_recording_changes_no_pixel_and_leaves_no_hook(pipe):
    processors = dict(pipe.unet.attn_processors)
    plain = pipe(PROMPT, num_inference_steps=3, seed=0, output_type="np", progress=False).images
    with probes.record_cross_attention(pipe.unet) as attention, probes.record_x0(pipe.unet, pipe.scheduler,
                                                                                   7.5) as steps:
        recorded = pipe(PROMPT, num_inference_steps=3, seed=0, output_type="np", progress=False).images
    assert np.array_equal(plain, recorded)
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in processors.items())
    counts, calls = dict(attention.counts), len(steps.x0)
    pipe(PROMPT, num_inference_steps=2, seed=0, progress=False)
    assert attention.counts == counts and len(steps.x0) == calls == 3  # nothing recorded after the block


def test_hooks_come_off_after_an_error(pipe):
    with pytest.raises(RuntimeError, match="stop"):
        with probes.record_cross_attention(pipe.unet) as attention, probes.record_x0(pipe.unet, pipe.scheduler,
                                                                                       7.5) as steps:
            raise RuntimeError("stop")
    pipe(PROMPT, num_inference_steps=2, seed=0, progress=False)
    assert attention.counts == {} and steps.x0 == []


def test_cross_attention_maps_are_distributions_over_tokens(pipe):
    with probes.record_cross_attention(pipe.unet) as attention:
        pipe([PROMPT, "a photo of a cat"], num_inference_steps=2, seed=0, progress=False)
    layers = len(_cross_attention_layers(pipe.unet))
    assert attention.counts == {16: layers * 2}  # the tiny UNet attends only at 4x4; 2 steps
    maps = attention.maps(16, 16)  # the tiny model draws 16x16 images
    assert maps.shape == (4, pipe.tokenizer.model_max_length, 16, 16)  # guided: [negatives, prompts]
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(4, 16, 16))
    assert attention.maps(4, 4, cells=[16]).shape == (4, pipe.tokenizer.model_max_length, 4, 4)
    with pytest.raises(ValueError, match=r"`height`, `width`: 16x8 does not match a recorded grid of 16 cells"):
        attention.maps(16, 8)
    with pytest.raises(ValueError, match=r"`cells`: nothing recorded at \[64\]; recorded \[16\]"):
        attention.maps(16, 16, cells=[64])


def test_probabilities_equal_diffusers_attention_scores(components):
    torch.manual_seed(0)
    attn = _cross_attention_layers(components["unet"])[0]
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    context = torch.randn(2, 5, attn.to_k.in_features)
    expected = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(hidden)),
                                         attn.head_to_batch_dim(attn.to_k(context)))
    probs = probes.cross_attention_probs(attn, hidden, context)
    assert probs.shape == (2, attn.heads, 16, 5)
    torch.testing.assert_close(probs.reshape(-1, 16, 5), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_equals_ddims_predicted_original_sample(prediction_type):
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = scheduler.timesteps[3]
    expected = scheduler.step(output, t, sample).pred_original_sample
    x0 = probes.x0_from_prediction(sample, output, scheduler.alphas_cumprod[t], prediction_type)
    torch.testing.assert_close(x0, expected)
    with pytest.raises(ValueError, match=r"`prediction_type`: got 'flow'"):
        probes.x0_from_prediction(sample, output, 0.5, "flow")


def test_recorded_x0_is_what_the_guided_ddim_step_moves_towards(pipe):
    """DDIM with eta = 0 steps to x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, eps implied by x0 and x_t."""
    with probes.record_x0(pipe.unet, pipe.scheduler, 3.0) as steps:
        pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, seed=0, progress=False)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    assert steps.timesteps == [float(t) for t in scheduler.timesteps]
    alphas = scheduler.alphas_cumprod
    for k in range(3):
        a, a_prev = alphas[int(steps.timesteps[k])], alphas[int(steps.timesteps[k + 1])]
        x_t, x0 = steps.samples[k], steps.x0[k]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        torch.testing.assert_close(steps.samples[k + 1], a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps,
                                   rtol=1e-4, atol=1e-4)


def test_prompt_tokens_label_embedding_positions(pipe):
    tokens = probes.prompt_tokens(pipe.tokenizer, PROMPT)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert tokens[1:-1] == PROMPT.split()
    assert len(tokens) == len(pipe.tokenizer(PROMPT)["input_ids"])


def test_a_unet_without_cross_attention_is_refused():
    with pytest.raises(ValueError, match=r"`unet`: Linear has no cross-attention layers"):
        with probes.record_cross_attention(torch.nn.Linear(2, 2)):
            pass
