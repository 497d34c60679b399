"""Scheduler names -> diffusers scheduler classes, keeping the model's own scheduler config."""

from __future__ import annotations

import copy
import functools
import inspect
import json

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (class, settings that make the name mean what users expect on top of the model's config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),  # Zhao et al. 2023: a predictor-corrector for few steps
    # few-step sampling with a consistency-distilled model or LoRA (Luo et al. 2023; TCD: Zheng et al. 2024);
    # `eta` is TCD's gamma, the share of noise put back each step
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}
_NAME_SETTINGS = {key for _, settings in SCHEDULERS.values() for key in settings}


def make_scheduler(name: str, config) -> SchedulerMixin:
    """A new scheduler of the named kind built from a model's scheduler config.

    Args:
        name: one of `SCHEDULERS` ("ddim", "pndm", "euler", "euler_a", "dpm++",
            "dpm++_karras", "lms", "heun", "ddpm", "unipc", "lcm", "tcd").
        config: the model's scheduler config (beta schedule, prediction type, ...), which is
            carried over; it is read, never changed.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"`scheduler`: unknown name {name!r}; expected one of {sorted(SCHEDULERS)}")
    cls, settings = SCHEDULERS[name]
    # Settings that define another name (karras sigmas, the solver type) are dropped, so that
    # switching "dpm++_karras" -> "lms" gives plain LMS, not LMS with karras sigmas.
    carried = {key: value for key, value in dict(config).items() if key not in _NAME_SETTINGS}
    return cls.from_config(carried, **settings)


def fresh_copy(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A scheduler of the same class and config with no state, so a call never changes the user's object.

    `from_config` inspects signatures and checks every entry (a few ms); it runs once per class
    and config, and each call gets a deep copy of that pristine scheduler.
    """
    key = (type(scheduler), json.dumps(dict(scheduler.config), sort_keys=True, default=str))
    if key not in _PRISTINE:
        if len(_PRISTINE) >= 32:
            _PRISTINE.clear()
        _PRISTINE[key] = type(scheduler).from_config(scheduler.config)
    return copy.deepcopy(_PRISTINE[key])


_PRISTINE: dict[tuple, SchedulerMixin] = {}  # (class, config) -> a scheduler that was never used


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Our name for a scheduler, or its class name where no name fits."""
    config = scheduler.config
    for name, (cls, settings) in SCHEDULERS.items():
        if type(scheduler) is cls and all(config.get(key) == value for key, value in settings.items()):
            return name
    return type(scheduler).__name__


@functools.cache
def _step_parameters(cls: type) -> frozenset[str]:
    # Any diffusers scheduler may be passed in, and only some take `generator`/`eta`: asked once per class.
    return frozenset(inspect.signature(cls.step).parameters)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | list | None, eta: float = 0.0) -> dict:
    """Extra arguments for `scheduler.step`: the generator for stochastic samplers, eta for DDIM."""
    accepted = _step_parameters(type(scheduler))
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs
