"""ControlNet (Zhang et al. 2023): steer where things go by a picture (edges, depth, pose, scribbles).

A ControlNet is a trainable copy of the UNet's encoder fed the control picture; its outputs are added
to the UNet's skip connections. `ControlledUNet` wraps the UNet so the loop keeps calling
`unet(x, t, encoder_hidden_states=context)`: at each call it runs every net on the same batch (with
guess mode, on the prompt's copy only, the others getting zeros), weights each net by its scale while
the step lies within its [start, end] share of the schedule, sums their residuals and calls the UNet.
This is what diffusers' `StableDiffusionControlNetPipeline` does, so the pixels are the same. On SDXL the
nets are wrapped like the UNet (`sdxl.AddedConditionsUNet`): they take the pooled projection and time ids
of the rows they run on, as in `StableDiffusionXLControlNetPipeline`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .. import images
from ..provenance.hashes import hash_state, weights_state


@dataclass
class Unit:
    """One ControlNet of a call: the net, its picture (B, 3, H, W) in [0, 1], and when and how much it acts."""

    net: torch.nn.Module
    image: torch.Tensor
    scale: float
    start: float
    end: float


def as_list(value, count: int, name: str) -> list:
    """A setting given once or per net, as one value per net."""
    values = value if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"`{name}`: {len(values)} values for {count} ControlNets; give one, or one per net")
    return list(values)


def check(nets, images_given, scales, starts, ends, guess_mode) -> None:
    """Refuse bad ControlNet arguments before any work (nets and images as lists)."""
    from diffusers import ControlNetModel

    for net in nets:
        if not isinstance(net, ControlNetModel):
            raise TypeError(f"`controlnet`: got {type(net).__name__}; expected a diffusers ControlNetModel or a list "
                            "of them (load one with ldm_pipeline.loading.controlnet.load_controlnet)")
    if len(images_given) != len(nets):
        raise ValueError(f"`control_image`: {len(images_given)} pictures for {len(nets)} ControlNets; give one per "
                         "net")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
            raise ValueError(f"`controlnet_conditioning_scale`: got {scale!r}; expected a finite number per net")
    for start, end in zip(starts, ends):
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start < end <= 1):
            raise ValueError(f"`control_guidance_start`, `control_guidance_end`: got {start!r}, {end!r}; expected "
                             "0 <= start < end <= 1 (the share of the steps a net acts in)")
    if not isinstance(guess_mode, bool):
        raise TypeError(f"`guess_mode`: got {guess_mode!r}; expected True or False")


# what a net shares with the UNet it was made for: its context width and its added conditions (SDXL's)
MATCHED = ("cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
           "projection_class_embeddings_input_dim")


def check_matches(nets, unet) -> None:
    """Refuse a net made for another kind of UNet (an SD 1.x net on an SDXL model, an SDXL net on SD 1.x)."""
    for i, net in enumerate(nets):
        for key in MATCHED:
            theirs, ours = net.config.get(key), unet.config.get(key)
            if theirs != ours:
                raise ValueError(f"`controlnet`: net {i} has {key}={theirs!r} and this model's UNet {ours!r}; expected "
                                 "a ControlNet made for this kind of model (SD 1.x, SD 2.x or SDXL)")


@dataclass
class Controls:
    """A call's ControlNets as given, checked: one entry per net."""

    nets: list
    pictures: list[PIL.Image.Image]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool


def controls_of(settings, own, unet) -> Controls | None:
    """The call's ControlNets (its `controlnet=`, else the pipeline's `own`), checked, also against the model's
    `unet`; None without any."""
    nets = settings.controlnet if settings.controlnet is not None else own
    if nets is None:
        if settings.control_image is not None:
            raise ValueError("`control_image`: given without a ControlNet; pass controlnet= (or build the pipeline "
                             "with one)")
        return None
    nets = list(nets) if isinstance(nets, (list, tuple)) else [nets]
    pictures = load_pictures(settings.control_image)
    count = len(nets)
    scales = as_list(settings.controlnet_conditioning_scale, count, "controlnet_conditioning_scale")
    starts = as_list(settings.control_guidance_start, count, "control_guidance_start")
    ends = as_list(settings.control_guidance_end, count, "control_guidance_end")
    check(nets, pictures, scales, starts, ends, settings.guess_mode)
    check_matches(nets, unet)
    # nets trained with pooled conditions (shuffle) take the prompt's copy only, as diffusers runs them
    guess = settings.guess_mode or any(net.config.get("global_pool_conditions", False) for net in nets)
    return Controls(nets, pictures, scales, starts, ends, guess)


def record(controls: Controls, given) -> list[dict]:
    """What a recipe keeps of each net: its name and weights' digest, its picture's digest (and file, when given
    as a path), its scale, start and end."""
    from ..provenance.recipes import image_hash

    paths = given if isinstance(given, (list, tuple)) else [given]
    return [dict(name=getattr(net, "ldm_name", None) or net.config.get("_name_or_path") or "controlnet",
                 digest=digest(net), image_hash=image_hash(picture),
                 image_path=str(Path(path).resolve()) if isinstance(path, (str, os.PathLike)) else None,
                 scale=scale, start=start, end=end)
            for net, picture, path, scale, start, end in zip(controls.nets, controls.pictures, paths, controls.scales,
                                                               controls.starts, controls.ends)]


def control_tensor(picture: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    """A control picture as the net takes it: (1, 3, height, width) in [0, 1], resized with Lanczos."""
    if picture.size != (width, height):
        picture = picture.resize((width, height), resample=PIL.Image.LANCZOS)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def units(nets: list, pictures: list[PIL.Image.Image], scales: list, starts: list, ends: list, batch: int,
          height: int, width: int, device) -> list[Unit]:
    """The call's ControlNets with their pictures at the drawn size, one row per image."""
    return [Unit(net, control_tensor(picture, height, width).repeat(batch, 1, 1, 1).to(device, net.dtype),
                 float(scale), float(start), float(end))
            for net, picture, scale, start, end in zip(nets, pictures, scales, starts, ends)]


def digest(net: torch.nn.Module) -> str:
    """A digest (32 hex) of a net's weights, as fp32 values: what a recipe records of it.

    Kept on the net until its cheap fingerprint (`weights_state`) changes: every call records its nets, and
    hashing SD 1.5's ControlNet (361 M weights) each time would cost seconds."""
    fingerprint = weights_state(net)
    cached = getattr(net, "_ldm_digest", None)
    if cached is None or cached[0] != fingerprint:
        state = hashlib.blake2b(digest_size=16)
        hash_state(state, net.state_dict())
        net._ldm_digest = (fingerprint, state.hexdigest())
    return net._ldm_digest[1]


class ControlledUNet:
    """The UNet with ControlNet residuals added, keeping its signature for the loop.

    Args:
        unet: the UNet (eager: a compiled package takes no residuals).
        units: the call's nets.
        steps: how many UNet calls the loop makes (one per timestep), for each net's [start, end].
        guess_mode: run the nets on the prompt's copy of the batch only; the other copies get none.
    """

    def __init__(self, unet, units: list[Unit], steps: int, guess_mode: bool):
        self.unet, self.units, self.steps, self.guess_mode = unet, units, steps, guess_mode
        self.calls = 0

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        step, self.calls = self.calls, self.calls + 1
        batch = self.units[0].image.shape[0]
        copies = sample.shape[0] // batch
        guessing = self.guess_mode and copies > 1
        net_sample = sample[-batch:] if guessing else sample
        net_context = encoder_hidden_states[-batch:] if guessing else encoder_hidden_states
        down, mid = None, None
        for unit in self.units:
            acts = not (step / self.steps < unit.start or (step + 1) / self.steps > unit.end)
            picture = unit.image if guessing else unit.image.repeat(copies, 1, 1, 1)
            d, m = unit.net(net_sample, timestep, encoder_hidden_states=net_context, controlnet_cond=picture,
                            conditioning_scale=unit.scale * float(acts), guess_mode=self.guess_mode,
                            return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if guessing:  # the other copies (the negative prompt's) are left as the UNet alone makes them
            down = [torch.cat([torch.zeros_like(d).repeat(copies - 1, 1, 1, 1), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid).repeat(copies - 1, 1, 1, 1), mid])
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs)


def load_pictures(given) -> list[PIL.Image.Image]:
    """The control pictures (one, or one per net) as RGB images."""
    if given is None:
        raise ValueError("`control_image`: a ControlNet needs its picture; pass control_image=")
    pictures = given if isinstance(given, (list, tuple)) else [given]
    return [images.load_image(picture, "control_image") for picture in pictures]
