"""The denoising loop and classifier-free guidance, shared by text-to-image and image-to-image."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

# callback(step, timestep, latents) -> False to stop early; anything else carries on.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], bool | None]


def guide(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): move from the unconditional towards the conditional."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


@torch.no_grad()
def denoise(
    unet,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    step_kwargs: dict,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """Run the reverse process over `timesteps` from `latents`.

    Args:
        latents: (B, C, h, w) starting latents, already scaled for the scheduler.
        cond, uncond: (B, L, D) text embeddings; with `uncond` given, one UNet call per step
            sees the batch `[uncond, cond]` and guidance mixes the two halves.
        step_kwargs: extra arguments for `scheduler.step` (generator, eta).
        callback: called after each step with (step, timestep, latents); returning False stops.

    Returns:
        `(latents, steps_run)`: the final (B, C, h, w) latents and how many steps ran.
    """
    context = cond if uncond is None else torch.cat([uncond, cond])
    steps_run = 0
    for step, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising")):
        model_input = latents if uncond is None else torch.cat([latents] * 2)
        model_input = scheduler.scale_model_input(model_input, t)
        noise = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        if uncond is not None:
            noise = guide(*noise.chunk(2), guidance_scale)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        steps_run += 1
        if callback is not None and callback(step, t, latents) is False:
            break
    return latents, steps_run
