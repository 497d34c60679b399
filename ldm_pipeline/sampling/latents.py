"""Images <-> latents, the starting noise, and where image-to-image starts.

Randomness: every draw goes through a generator, or a list of them with one per image, as
diffusers does, so the same seeds give diffusers' pixels. Noise for `seed=` is drawn on the
CPU and then moved, so a seed means the same picture on any device.
"""

from __future__ import annotations

import numbers
import secrets

import torch
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | list[torch.Generator] | None


def vae_scale_factor(vae) -> int:
    """How many pixels one latent cell spans per side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def seeds_for(seed: int | list[int] | None, count: int) -> list[int]:
    """One seed per image: `seed + i` for an int, the list itself, or fresh random seeds for None."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, numbers.Integral):  # numpy integers too; int() keeps S + i from overflowing them
        return [int(seed) + i for i in range(count)]
    if len(seed) != count:
        raise ValueError(f"`seed`: a list of {len(seed)} seeds for {count} images; give one seed per image")
    return [int(s) for s in seed]


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, so an image depends only on its own seed."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(shape: tuple[int, ...], generator: Generators, device, dtype) -> torch.Tensor:
    """Gaussian noise of `shape` (B, C, h, w), drawn per image when `generator` is a list."""
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def encode_image(vae, pixels: torch.Tensor, count: int, generator: Generators) -> torch.Tensor:
    """Sample the VAE posterior of one reference picture for `count` images, in diffusion latent space.

    Args:
        pixels: (1, 3, H, W) in [-1, 1], on the VAE's device and dtype.
        count: how many images start from this picture.
        generator: one generator (one sample, shared by all images) or one per image (each
            image its own sample, so it depends only on its own generator).

    Returns:
        (count, C, H / f, W / f) latents times the VAE's `scaling_factor`.
    """
    posterior = vae.encode(pixels).latent_dist
    if isinstance(generator, list):
        latents = torch.cat([posterior.sample(one) for one in generator])
    else:
        latents = posterior.sample(generator).repeat(count, 1, 1, 1)
    return latents * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) diffusion latents -> (B, 3, h * f, w * f) pixels in about [-1, 1]."""
    dtype = next(vae.parameters()).dtype  # diffusers' `vae.dtype` walks every module
    return vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The tail of the scheduler's timesteps that image-to-image runs (diffusers' meaning of strength).

    `int(num_inference_steps * strength)` steps run, starting from the reference noised to the
    first of them. Call after `scheduler.set_timesteps`.
    """
    start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    begin = start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def img2img_start(scheduler, reference_latents: torch.Tensor, timestep: torch.Tensor,
                  generator: Generators) -> torch.Tensor:
    """Noise the reference's latents forward to `timestep`: q(x_t | x_0) for the first step that runs."""
    noise = initial_noise(tuple(reference_latents.shape), generator, reference_latents.device,
                          reference_latents.dtype)
    timesteps = timestep.reshape(1).repeat(reference_latents.shape[0])
    return scheduler.add_noise(reference_latents, noise, timesteps)


def _cutoff(scheduler, share: float) -> int:
    """The training timestep at `share` of the way from pure noise (diffusers' discrete cutoff)."""
    total = scheduler.config.num_train_timesteps
    return int(round(total - share * total))


def timesteps_until(scheduler, timesteps: torch.Tensor, denoising_end: float | None) -> torch.Tensor:
    """The timesteps that run before `denoising_end` of the schedule (all for None): those at or above the
    cutoff, as diffusers' SDXL pipelines cut them for a base that hands its latents to a refiner."""
    if denoising_end is None:
        return timesteps
    cutoff = _cutoff(scheduler, denoising_end)
    return timesteps[:int((timesteps >= cutoff).sum())]


def timesteps_from(scheduler, denoising_start: float) -> torch.Tensor:
    """The tail of the schedule after `denoising_start` (a refiner going on from a base's latents): the timesteps
    below the cutoff, one more for a second-order scheduler cut between its two evaluations. Call after
    `scheduler.set_timesteps`; it sets the scheduler's begin index."""
    cutoff = _cutoff(scheduler, denoising_start)
    count = int((scheduler.timesteps < cutoff).sum())
    if scheduler.order == 2 and count % 2 == 0 and count < len(scheduler.timesteps):
        count += 1
    begin = len(scheduler.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]
