"""Guards on the numbers: NaN or infinity that the models produce raise NonFiniteError naming the step, an fp16
VAE that overflows decodes again in fp32, and calls that cannot fit in memory are refused before allocating."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm_pipeline import NonFiniteError
from ldm_pipeline.runtime import guards
from ldm_pipeline.loading.single_file import config_dir

FAST = dict(num_inference_steps=5, progress=False, output_type="np", seed=0)


def poison_unet_from_call(pipe, monkeypatch, first_bad_call: int):
    """Make the UNet return NaN from its `first_bad_call`-th call (1-based) on."""
    forward = pipe.unet.forward
    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        if len(calls) >= first_bad_call:
            out = (torch.full_like(out[0], float("nan")),) if isinstance(out, tuple) else out
        return out

    monkeypatch.setattr(pipe.unet, "forward", run)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_nan_from_the_unet_names_the_first_bad_step(pipe, monkeypatch, guidance):
    poison_unet_from_call(pipe, monkeypatch, 3)
    with pytest.raises(NonFiniteError, match=r"the latents hold NaN or infinity, first at step 3 of 5: .*try a lower "
                                             r"guidance_scale"):
        pipe("a cat", guidance_scale=guidance, **FAST)


def test_non_finite_error_is_a_value_error_and_the_callback_still_runs(pipe, monkeypatch):
    poison_unet_from_call(pipe, monkeypatch, 1)
    seen = []
    with pytest.raises(ValueError, match=r"first at step 1 of 2"):
        pipe("a cat", callback=lambda step, t, latents: seen.append(step) or step < 1, **FAST)
    assert seen == [0, 1]  # the callback stopped the loop after two steps, and the error says so


def test_overflowing_guidance_is_caught_not_returned(pipe):
    # a finite but absurd guidance scale overflows float32 within two steps
    with pytest.raises(NonFiniteError, match=r"first at step [12] of 5"):
        pipe("a cat", guidance_scale=1e38, **FAST)


def test_output_latent_is_checked_too(pipe, monkeypatch):
    poison_unet_from_call(pipe, monkeypatch, 2)
    with pytest.raises(NonFiniteError, match=r"first at step 2 of 5"):
        pipe("a cat", **{**FAST, "output_type": "latent"})


def test_a_fp32_vae_that_overflows_raises(pipe):
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"the decoded pixels hold NaN or infinity although the latents are "
                                             r"finite: the VAE overflowed;"):
        pipe("a cat", **FAST)


def overflow_in_half(conv) -> None:
    """Scale a convolution (in an fp16 model) so that its largest weight is 60000, just inside fp16's range, while
    its outputs, sums of dozens of such products, pass fp16's 65504 (they stay far inside fp32's range).

    The GroupNorm that follows removes the scale again, so fp32 pixels are ordinary ones.
    """
    with torch.no_grad():
        scale = 60000 / conv.weight.float().abs().max()
        conv.weight.copy_(conv.weight.float() * scale)
        conv.bias.copy_(conv.bias.float() * scale)


def test_fp16_vae_overflow_decodes_again_in_fp32(pipe):
    pipe.to("cpu", torch.float16)
    overflow_in_half(pipe.vae.decoder.conv_in)
    latents = pipe("a cat", **{**FAST, "output_type": "latent"}).images
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample).all()
    weights = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    with pytest.warns(UserWarning, match=r"the VAE's torch.float16 decode gave NaN or infinity; decoding again in "
                                         r"float32"):
        images = pipe("a cat", **FAST).images
    assert np.isfinite(images).all() and images.std() > 0
    # the same pixels as an fp32 decode of the same latents, and the VAE is left as it was
    assert pipe.vae.dtype == torch.float16
    assert all(torch.equal(weights[k], v) for k, v in pipe.vae.state_dict().items())
    reference = pipe.vae.float()
    with torch.no_grad():
        pixels = reference.decode(latents.float() / reference.config.scaling_factor).sample
    expected = ((pixels / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - expected).max() < 1e-3


def test_fp16_vae_overflow_on_encode_also_retries_in_fp32(pipe):
    pipe.to("cpu", torch.float16)
    overflow_in_half(pipe.vae.encoder.conv_in)
    reference = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"encode of `image` gave NaN or infinity; encoding again in float32"):
        images = pipe("a cat", image=reference, **FAST).images
    assert np.isfinite(images).all()


def test_finite_calls_give_no_warning_and_the_same_pixels_with_the_guard(pipe, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guarded = pipe("a cat", **FAST).images
    monkeypatch.setattr(guards, "check_latents", lambda *args: None)
    monkeypatch.setattr(guards, "decode_checked", lambda vae, latents, upcast=False: pipe.vae.decode(
        latents / pipe.vae.config.scaling_factor).sample)
    assert np.array_equal(guarded, pipe("a cat", **FAST).images)


def test_memory_limit_can_be_lowered_and_raised(pipe, monkeypatch):
    monkeypatch.setattr(guards, "MEMORY_LIMIT", 40_000)
    with pytest.raises(ValueError, match=r"1 image\(s\) of 16x16 in torch.float32 need at least 4.58e-05 GiB, more "
                                         r"than the limit ldm_pipeline.runtime.guards.MEMORY_LIMIT \(3.73e-05 GiB\)"):
        pipe("a cat", **FAST)
    pipe("a cat", **{**FAST, "output_type": "latent"})  # no decode: only the UNet's share counts
    monkeypatch.setattr(guards, "MEMORY_LIMIT", float("inf"))
    assert pipe("a cat", **FAST).images.shape == (1, 16, 16, 3)


def test_the_bound_leaves_real_use_alone():
    """Stable Diffusion 1.5 at 1024x1024, batch 4, fp16 is allowed on a 24 GB GPU; the issue's sizes are not."""
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir("sd15") / "vae"))
    unet = None  # only the VAE counts when decoding
    needed = guards.memory_needed(vae, unet, 4, 1024, 1024, torch.float16, decode=True)
    assert 2 * 2**30 < needed < 24 * 2**30
    assert guards.memory_needed(vae, unet, 1, 100_000, 100_000, torch.float32, decode=True) > 2**40
    assert guards.memory_needed(vae, unet, 10**9, 512, 512, torch.float16, decode=True) > 2**50


def test_an_image_too_small_for_the_vae_is_refused_before_it_encodes(pipe, monkeypatch):
    """A 2x2 reference leaves GroupNorm one value per group in the tiny VAE's encoder (found by the fuzzer)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("vae.encode ran")

    monkeypatch.setattr(pipe.vae, "encode", forbidden)
    with pytest.raises(ValueError, match=r"`image`: 2x2 is too small for this VAE to encode"):
        pipe("a cat", image=np.zeros((2, 2, 3), np.uint8), **FAST)


def test_vae_tiling_and_slicing_do_not_lift_the_bound_on_the_images_themselves(pipe):
    pipe.enable_vae_tiling()
    pipe.enable_vae_slicing()
    with pytest.raises(ValueError, match=r"1 image\(s\) of 100000x100000 in torch.float32 need at least 112 GiB"):
        pipe("a cat", height=100_000, width=100_000, **FAST)
    with pytest.raises(ValueError, match=r"1000000000 image\(s\) of 16x16"):
        pipe("a cat", num_images_per_prompt=10**9, **FAST)
