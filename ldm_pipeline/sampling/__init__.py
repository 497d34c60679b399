"""Sampling: the one denoising loop, schedulers by name, starting latents, live previews and probes.

`loop.denoise` runs every mode (text-to-image, image-to-image, guided or not); what steers it
comes in as `guidance.base.Guidance` objects and per-step hooks that receive a `loop.StepState`.
"""

from .loop import StepCallback, StepHook, StepState, denoise
