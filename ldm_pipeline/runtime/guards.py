"""Guards around the numbers: calls that cannot fit in memory are refused before anything is
allocated, non-finite latents or pixels raise `NonFiniteError` naming the step where they first
appeared, and a half-precision VAE that overflows is run again in fp32 (with a warning).

Inputs are checked for finiteness in `checks`; this module watches what the models produce.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..sampling import latents as latent_ops

# The most memory a call may plan to use, in bytes. None: the device's whole memory (RAM for the
# CPU, the GPU's memory for CUDA). Set a number to refuse smaller calls, or float("inf") to turn
# the check off. The estimate is a lower bound, so a call it refuses cannot fit at all.
MEMORY_LIMIT: float | None = None

HALF = (torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """The latents or pixels of a call hold NaN or infinity."""


def device_memory(device: torch.device) -> int | None:
    """Total memory of a device in bytes, or None when it cannot be known."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        pass
    return None


def memory_needed(vae, unet, batch: int, height: int, width: int, dtype: torch.dtype, decode: bool) -> int:
    """A lower bound on the bytes a call needs at its peak.

    The VAE decoder's last block works at full resolution: its input (the last upsampler's
    channels) and its output live together, for every image of the batch at once. Without
    decoding, the UNet's first block at latent resolution, for the guided batch of two halves.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if decode:
        pixels = batch * 3 * height * width * itemsize  # the decoded images themselves, however they are decoded
        # with VAE slicing one image decodes at a time; with tiling one tile (pipe.enable_vae_tiling)
        batch = 1 if getattr(vae, "use_slicing", False) else batch
        if getattr(vae, "use_tiling", False):
            height, width = min(height, vae.tile_sample_min_size), min(width, vae.tile_sample_min_size)
        channels = list(vae.config.block_out_channels)
        full_resolution = channels[0] + (channels[1] if len(channels) > 1 else channels[0])
        return max(pixels, batch * full_resolution * height * width * itemsize)
    factor = latent_ops.vae_scale_factor(vae)
    return 2 * batch * 2 * unet.config.block_out_channels[0] * (height // factor) * (width // factor) * itemsize


def check_fits(vae, unet, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
               decode: bool = True) -> None:
    """Refuse a call whose images cannot fit in memory, before anything is allocated."""
    limit = MEMORY_LIMIT if MEMORY_LIMIT is not None else device_memory(torch.device(device))
    if limit is None:
        return
    needed = memory_needed(vae, unet, batch, height, width, dtype, decode)
    if needed > limit:
        where = "the limit ldm_pipeline.runtime.guards.MEMORY_LIMIT" if MEMORY_LIMIT is not None else \
            f"the memory of the {torch.device(device).type} device"
        raise ValueError(
            f"`num_images_per_prompt`, `height`, `width`: {batch} image(s) of {width}x{height} in {dtype} need at "
            f"least {needed / 2**30:.3g} GiB, more than {where} ({limit / 2**30:.3g} GiB); draw fewer images per "
            "call or a smaller size. To try anyway, raise ldm_pipeline.runtime.guards.MEMORY_LIMIT (bytes; "
            "float('inf') turns the check off)"
        )


def _advice(dtype: torch.dtype) -> str:
    tries = ["a lower guidance_scale", "another scheduler or step count"]
    if dtype in HALF:
        tries.insert(0, "full precision (pipe.to(device, torch.float32))")
    return "try " + ", ".join(tries)


class StepWatch:
    """Wraps a step callback and notes, without waiting for the device, whether each step's latents are finite.

    `first_bad_step()` reads the notes once, after the loop: one reduction per step and a
    single device sync per call.
    """

    def __init__(self, callback=None):
        self.callback = callback
        self._finite: list[torch.Tensor] = []

    def __call__(self, state) -> bool | None:  # a `sampling.StepState`, after the step
        self._finite.append(torch.isfinite(state.latents).all())
        if self.callback is not None:
            return self.callback(state.step, state.timestep, state.latents)
        return None

    def first_bad_step(self) -> int | None:
        """The 0-based index of the first step whose latents were not finite, or None."""
        if not self._finite:
            return None
        finite = torch.stack(self._finite).cpu()
        if bool(finite.all()):
            return None
        return int((~finite).nonzero()[0, 0])


def check_latents(latents: torch.Tensor, watch: StepWatch, steps_run: int) -> None:
    """Raise `NonFiniteError` if the final latents are not finite, naming the first bad step."""
    bad = watch.first_bad_step()
    if bad is None and bool(torch.isfinite(latents).all()):
        return
    where = f"at step {bad + 1} of {steps_run}" if bad is not None else "before the first step"
    raise NonFiniteError(
        f"the latents hold NaN or infinity, first {where}: the UNet or the scheduler overflowed; "
        f"{_advice(latents.dtype)}"
    )


def decode_checked(vae, latents: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """`latents.decode_latents`, then a check: a half-precision VAE whose pixels are not finite (the
    known fp16 overflow of Stable Diffusion's VAE) decodes again in fp32, with a warning.

    Args:
        upcast: an fp16 VAE decodes in fp32 straight away (SDXL's VAE, whose config says `force_upcast`,
            overflows in fp16; diffusers' SDXL pipelines do the same).

    Returns:
        (B, 3, H, W) finite pixels in the VAE's dtype (float32 when upcast).
    Raises:
        NonFiniteError: when the pixels are not finite in float32 either.
    """
    if upcast and vae.dtype == torch.float16:
        pixels = run_in_float32(vae, lambda: latent_ops.decode_latents(vae, latents.float()))
        if bool(torch.isfinite(pixels).all()):
            return pixels
        raise NonFiniteError("the decoded pixels hold NaN or infinity although the VAE ran in float32; the latents "
                             f"are out of the VAE's range, {_advice(latents.dtype)}")
    pixels = latent_ops.decode_latents(vae, latents)
    if bool(torch.isfinite(pixels).all()):
        return pixels
    if vae.dtype in HALF:
        warnings.warn(f"the VAE's {vae.dtype} decode gave NaN or infinity; decoding again in float32",
                      stacklevel=3)
        pixels = run_in_float32(vae, lambda: latent_ops.decode_latents(vae, latents.float()))
        if bool(torch.isfinite(pixels).all()):
            # what postprocess keeps anyway; clamped first so that the cast back cannot overflow
            return pixels.clamp(-1, 1).to(vae.dtype)
    raise NonFiniteError(
        "the decoded pixels hold NaN or infinity although the latents are finite: the VAE overflowed"
        + (" even in float32" if vae.dtype in HALF else "") + "; the latents are out of the VAE's range, "
        f"{_advice(vae.dtype)}"
    )


def encode_checked(vae, pixels: torch.Tensor, count: int, generator, upcast: bool = False) -> torch.Tensor:
    """`latents.encode_image` with the same fp32 retry as `decode_checked`, for image-to-image's reference.

    The retry rewinds the generators first, so it draws the same posterior sample. With `upcast` a
    half-precision VAE encodes in fp32 straight away (as diffusers' SDXL pipelines do for `force_upcast`).
    """
    # GroupNorm needs two values per group: at the encoder's deepest level that is its narrowest blocks' channels
    # per group times the latent cells, which an image of a few pixels does not reach
    config = vae.config
    cells = (pixels.shape[2] // latent_ops.vae_scale_factor(vae)) * (pixels.shape[3] // latent_ops.vae_scale_factor(vae))
    if cells * min(config.block_out_channels) // config.norm_num_groups < 2:
        raise ValueError(f"`image`: {pixels.shape[3]}x{pixels.shape[2]} is too small for this VAE to encode; "
                         "give a larger image or height= and width=")
    if upcast and vae.dtype in HALF:
        encoded = run_in_float32(vae, lambda: latent_ops.encode_image(vae, pixels.float(), count, generator))
        if bool(torch.isfinite(encoded).all()):
            return encoded.to(vae.dtype)
        raise NonFiniteError("the VAE's float32 encoding of `image` holds NaN or infinity; check the image")
    generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
    states = [g.get_state() for g in generators]
    encoded = latent_ops.encode_image(vae, pixels, count, generator)
    if bool(torch.isfinite(encoded).all()):
        return encoded
    if vae.dtype in HALF:
        warnings.warn(f"the VAE's {vae.dtype} encode of `image` gave NaN or infinity; encoding again in float32",
                      stacklevel=3)
        for g, state in zip(generators, states):
            g.set_state(state)
        encoded = run_in_float32(vae, lambda: latent_ops.encode_image(vae, pixels.float(), count, generator))
        if bool(torch.isfinite(encoded).all()):
            return encoded.to(vae.dtype)
    raise NonFiniteError(
        "the VAE's encoding of `image` holds NaN or infinity" + (" even in float32" if vae.dtype in HALF else "")
        + "; check the image, or try full precision (pipe.to(device, torch.float32))"
    )


def run_in_float32(model, work):
    """`work()` with `model` cast to float32, cast back afterwards (exact: fp16 and bf16 fit in fp32)."""
    dtype = model.dtype
    model.to(torch.float32)
    try:
        return work()
    finally:
        model.to(dtype)
