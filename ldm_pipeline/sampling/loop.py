"""The denoising loop, shared by text-to-image and image-to-image, and the step state it shares.

Guidance is one small interface (`guidance.base.Guidance`). Each step the loop makes one UNet call on a batch holding the
prompt's context and whatever extra contexts the guidances ask for (`Guidance.contexts`), then
hands each guidance in turn the prediction so far, the UNet outputs for its own contexts and the
`StepState`; each returns the prediction the next one (and finally the scheduler) receives.
`guidance.base.ClassifierFree` asks for the negative prompt's context and mixes the two outputs;
`guidance.ClipGuidance` asks for none and follows a CLIP's gradient instead. A third kind needs
only those two members.

After each step every hook receives the `StepState` (with the guided prediction and the new
latents); a hook returning False stops the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # guidances import StepState from here
    from ..guidance.base import Guidance

# The user's callback(step, timestep, latents) -> False to stop early; anything else carries on.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], bool | None]


def alpha_bar(alphas_cumprod: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """alpha-bar of the training schedule at `timestep`, linearly interpolated between integer steps
    (Karras-spaced Euler timesteps are fractional). A 0-dim float32 tensor."""
    last = len(alphas_cumprod) - 1
    t = min(max(float(timestep), 0.0), float(last))
    low = int(t)
    high, weight = min(low + 1, last), t - low
    return (alphas_cumprod[low].float() * (1 - weight) + alphas_cumprod[high].float() * weight).cpu()


def x0_from_prediction(sample: torch.Tensor, model_output: torch.Tensor, alpha_cumprod: torch.Tensor | float,
                       prediction_type: str) -> torch.Tensor:
    """The clean latents x_0 implied by one model output at x_t = sqrt(a) x_0 + sqrt(1 - a) noise.

    epsilon: x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) (Song et al. 2021, eq. 12);
    v_prediction: x_0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022); sample: the output.

    Args:
        sample: (B, C, h, w) noisy latents x_t in the variance-preserving scale (what the
            UNet receives after `scheduler.scale_model_input`).
        model_output: (B, C, h, w) the (guided) UNet output.
        alpha_cumprod: a = alpha-bar at the step's timestep. Epsilon prediction at a = 0
            (the first step of a zero-terminal-SNR schedule) has no x_0: the result is inf.

    Returns:
        (B, C, h, w) predicted x_0, float32.
    """
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float32, device=sample.device)
    sample, model_output = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"`prediction_type`: got {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")


def prediction_from_x0(sample: torch.Tensor, x0: torch.Tensor, alpha_cumprod: torch.Tensor | float,
                       prediction_type: str) -> torch.Tensor:
    """The model output that implies clean latents `x0` at `sample` (the inverse of `x0_from_prediction`).

    The noise is what is left of x_t once x_0 is taken out: eps = (x_t - sqrt(a) x_0) / sqrt(1 - a);
    v = sqrt(a) eps - sqrt(1 - a) x_0 = (sqrt(a) x_t - x_0) / sqrt(1 - a). At a = 1 (no noise)
    only "sample" has an answer.
    """
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float32, device=sample.device)
    sample, x0 = sample.float(), x0.float()
    if prediction_type == "epsilon":
        return (sample - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return (a.sqrt() * sample - x0) / (1 - a).sqrt()
    if prediction_type == "sample":
        return x0
    raise ValueError(f"`prediction_type`: got {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")


@dataclass
class StepState:
    """One denoising step as guidances and hooks see it.

    `sample` is what the UNet saw for one copy of the batch, in the variance-preserving scale
    (after `scheduler.scale_model_input`), so the x_0 maths holds for every scheduler.
    `prediction` (the guided model output) and `latents` (after the scheduler's step) are
    filled in as the step goes.
    """

    step: int
    timestep: torch.Tensor
    sample: torch.Tensor
    alphas_cumprod: torch.Tensor
    prediction_type: str
    prediction: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @property
    def alpha_bar(self) -> torch.Tensor:
        return alpha_bar(self.alphas_cumprod, self.timestep)

    def denoised(self, prediction: torch.Tensor | None = None) -> torch.Tensor:
        """The clean latents x_0 (B, C, h, w, float32) that `prediction` (default: the step's guided one) implies."""
        prediction = self.prediction if prediction is None else prediction
        return x0_from_prediction(self.sample, prediction, self.alpha_bar, self.prediction_type)

    def prediction_for(self, x0: torch.Tensor) -> torch.Tensor:
        """The model output (float32) that implies clean latents `x0` from this step's sample."""
        return prediction_from_x0(self.sample, x0, self.alpha_bar, self.prediction_type)


StepHook = Callable[[StepState], bool | None]


@torch.no_grad()
def denoise(
    unet,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    guidances: Sequence[Guidance] = (),
    step_kwargs: dict | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """Run the reverse process over `timesteps` from `latents`.

    Args:
        latents: (B, C, h, w) starting latents, already scaled for the scheduler.
        cond: (B, L, D) the prompt's text embeddings.
        guidances: applied in order each step; the UNet sees the batch
            `[*contexts of the guidances, cond]` in one call (`[uncond, cond]` for classifier-free).
        step_kwargs: extra arguments for `scheduler.step` (generator, eta).
        hooks: called after each step with the `StepState`; one returning False stops the loop
            (every hook still runs that step). A hook may replace `state.latents` (inpainting puts
            the known region back); hooks that only watch change no pixel.

    Returns:
        `(latents, steps_run)`: the final (B, C, h, w) latents and how many steps ran.
    """
    contexts = [context for guidance in guidances for context in guidance.contexts] + [cond]
    copies = len(contexts)
    context = torch.cat(contexts) if copies > 1 else cond
    batch = latents.shape[0]
    steps_run = 0
    for step, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising")):
        model_input = torch.cat([latents] * copies) if copies > 1 else latents
        model_input = scheduler.scale_model_input(model_input, t)
        outputs = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0].chunk(copies)
        state = StepState(step, t, model_input[-batch:], scheduler.alphas_cumprod, scheduler.config.prediction_type)
        prediction, first = outputs[-1], 0
        for guidance in guidances:
            taken = len(guidance.contexts)
            prediction = guidance(prediction, outputs[first:first + taken], state)
            first += taken
        state.prediction = prediction
        latents = scheduler.step(prediction, t, latents, **(step_kwargs or {}), return_dict=False)[0]
        state.latents = latents
        steps_run += 1
        stop = any([hook(state) is False for hook in hooks])
        latents = state.latents  # a hook may put known latents back (inpainting); observers leave it
        if stop:
            break
    return latents, steps_run
