"""The guidance interface and classifier-free guidance, the way of steering every call uses.

A `Guidance` names the contexts it adds to the UNet's batch and turns the UNet's outputs for
them into the prediction the scheduler steps with (see `sampling.loop.denoise`). Classifier-free
guidance is the CompVis idiom: the batch `[uncond, cond]`, then `uncond + s * (cond - uncond)`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..sampling.loop import StepState


def guide(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): move from the unconditional towards the conditional."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


class Guidance:
    """One way of steering each step: the contexts it adds to the UNet batch, and how it turns
    the UNet's outputs into the prediction the scheduler steps with.

    `__call__(prediction, outputs, state)`: `prediction` is the prompt's output or what earlier
    guidances made of it, `outputs` are the UNet's outputs for this guidance's `contexts`
    (in order), `state` the `StepState`. Returns the new prediction (same shape and dtype).
    """

    contexts: tuple[torch.Tensor, ...] = ()

    def __call__(self, prediction: torch.Tensor, outputs: Sequence[torch.Tensor], state: StepState) -> torch.Tensor:
        raise NotImplementedError


class ClassifierFree(Guidance):
    """Classifier-free guidance: the negative prompt's output, pushed `scale` times towards the prompt's."""

    def __init__(self, uncond: torch.Tensor, scale: float):
        self.contexts, self.scale = (uncond,), scale

    def __call__(self, prediction, outputs, state):
        return guide(outputs[0], prediction, self.scale)
