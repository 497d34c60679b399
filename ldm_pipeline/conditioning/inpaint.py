"""Inpainting: repaint the masked part of a picture and give the rest back exactly.

Two kinds of UNet, as in diffusers' `StableDiffusionInpaintPipeline`:
- a 9-channel inpainting UNet (SD 1.5 / 2 inpainting) sees `[latents, mask, masked image latents]`
  at every call (`InpaintUNet`, a wrapper with the UNet's own signature);
- any 4-channel UNet has the known region re-noised to the next timestep and put back after every
  step (`KeepKnown`, a step hook), so only the masked part is drawn.

Either way every pixel goes through the VAE again, which is why diffusers' unmasked areas drift;
here the finished pixels are pasted over the picture through the mask softened by `mask_blur`
(AUTOMATIC1111's way), so outside the mask and its band the picture is the user's own. With
`padding_mask_crop` the work happens on a crop around the mask at the model's full size and is
pasted back into the whole picture (A1111's "inpaint only masked").

A base may stop part-way (`denoising_end`) and hand its latents to a refiner that goes on from them
(`denoising_start`, `resume`), as diffusers' `StableDiffusionXLInpaintPipeline` does; the refiner gives
the picture back outside the mask when it is passed as `original_image`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .. import images, masks
from ..runtime import guards
from ..sampling import latents as latent_ops
from ..sampling.loop import StepState


@dataclass
class Region:
    """The picture and mask a call works on, and how its result goes back into the whole picture."""

    picture: PIL.Image.Image | None  # the whole reference, RGB; None: going on from latents without it
    mask: PIL.Image.Image  # binary "L" (255 = repaint), the picture's size
    box: tuple[int, int, int, int] | None  # with padding_mask_crop: the crop that is drawn, in the picture
    work_picture: PIL.Image.Image | None  # what is drawn from: the picture or its crop, at the drawn size
    work_mask: PIL.Image.Image  # the mask at the drawn size, binary


def region(picture: PIL.Image.Image | None, mask: PIL.Image.Image, height: int, width: int,
           padding: int | None) -> Region:
    """The work picture and mask at the drawn size (height, width): the whole, or the crop around the mask.
    `picture` may be None (going on from latents without `original_image`): the mask alone is worked."""
    box = masks.crop_box(mask, padding, width / height) if padding is not None else None
    work_picture, work_mask = (picture, mask) if box is None else (
        picture.crop(box) if picture is not None else None, mask.crop(box))
    if work_mask.size != (width, height):
        work_picture = work_picture.resize((width, height), resample=PIL.Image.LANCZOS) \
            if work_picture is not None else None
        work_mask = work_mask.resize((width, height), resample=PIL.Image.LANCZOS).point(
            lambda v: 255 if v >= 128 else 0)
    return Region(picture=picture, mask=mask, box=box, work_picture=work_picture, work_mask=work_mask)


@dataclass
class Known:
    """What the loop keeps of the picture, in latent space."""

    mask: torch.Tensor  # (1, 1, h, w): 1 = repaint, the work mask at latent size (nearest, as diffusers)
    image_latents: torch.Tensor | None  # (B, C, h, w) the picture's latents (4-channel UNets; a hand-off's latents)
    noise: torch.Tensor  # (B, C, h, w) the starting noise, re-used to noise the known region
    masked_latents: torch.Tensor | None  # (B, C, h, w) latents of the picture with the mask greyed (9-channel)


def start(pipe, work: Region, count: int, generator, scheduler, timesteps: torch.Tensor, strength: float,
          masked_content: str) -> tuple[torch.Tensor, Known]:
    """The starting latents of an inpaint call and what the loop keeps of the picture.

    Random numbers are drawn in diffusers' order: the picture's posterior sample (when the UNet has 4
    channels or `strength` < 1), the noise, then the masked picture's sample (9 channels).
    """
    nine = pipe.unet.config.in_channels == 9
    picture = masks.fill(work.work_picture, work.work_mask) if masked_content == "fill" else work.work_picture
    height, width = work.work_picture.height, work.work_picture.width
    pixels = images.to_tensor(picture, height, width).to(pipe.device, pipe.vae.dtype)
    mask = _latent_mask(pipe, work)
    pure_noise = strength == 1.0
    image_latents = None
    if not nine or not pure_noise:
        image_latents = guards.encode_checked(pipe.vae, pixels, count, generator,
                                              upcast=pipe.vae_upcast).to(pipe.dtype)
    factor = pipe.vae_scale_factor
    shape = (count, pipe.vae.config.latent_channels, height // factor, width // factor)
    noise = latent_ops.initial_noise(shape, generator, pipe.device, pipe.dtype)
    if image_latents is not None and masked_content in ("latent_noise", "latent_nothing"):
        filler = latent_ops.initial_noise(shape, generator, pipe.device, pipe.dtype) \
            if masked_content == "latent_noise" else torch.zeros_like(image_latents)
        image_latents = image_latents * (1 - mask) + filler * mask
    if pure_noise:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(count))
    masked_latents = _masked_latents(pipe, work, count, generator) if nine else None
    return latents, Known(mask=mask, image_latents=image_latents, noise=noise, masked_latents=masked_latents)


def resume(pipe, work: Region, latents: torch.Tensor, generator) -> Known:
    """What the loop keeps when inpainting goes on from a base's latents (B, C, h, w) (`denoising_start`): the
    loop starts from them as they are, and the known region is those latents themselves, re-noised to each next
    timestep, as in diffusers' SDXL inpainting pipeline. That region holds the picture's clean latents: the
    base's last step put them there (`KeepKnown` adds no noise after the last step it runs).

    Random numbers: the noise, then (9 channels) the sample of the masked `original_image`, which diffusers
    takes ready-encoded as `masked_image_latents`.
    """
    nine = pipe.unet.config.in_channels == 9
    noise = latent_ops.initial_noise(tuple(latents.shape), generator, pipe.device, pipe.dtype)
    masked_latents = _masked_latents(pipe, work, latents.shape[0], generator) if nine else None
    return Known(mask=_latent_mask(pipe, work), image_latents=None if nine else latents, noise=noise,
                 masked_latents=masked_latents)


def _latent_mask(pipe, work: Region) -> torch.Tensor:
    """The work mask (1, 1, h, w) at latent size, 1 = repaint (nearest, as diffusers)."""
    factor = pipe.vae_scale_factor
    mask = torch.from_numpy(np.asarray(work.work_mask, dtype=np.float32) / 255.0)[None, None]
    size = (work.work_mask.height // factor, work.work_mask.width // factor)
    return F.interpolate(mask, size=size).to(pipe.device, pipe.dtype)


def _masked_latents(pipe, work: Region, count: int, generator) -> torch.Tensor:
    """A posterior sample (count, C, h, w) of the work picture with the mask greyed: a 9-channel UNet's input."""
    height, width = work.work_picture.height, work.work_picture.width
    keep = torch.from_numpy(np.asarray(work.work_mask, dtype=np.float32) < 128)[None, None]
    masked_pixels = images.to_tensor(work.work_picture, height, width) * keep
    return guards.encode_checked(pipe.vae, masked_pixels.to(pipe.device, pipe.vae.dtype), count, generator,
                                 upcast=pipe.vae_upcast).to(pipe.dtype)


class InpaintUNet:
    """A 9-channel inpainting UNet with the 4-channel signature: it adds the mask and the masked
    picture's latents to every call, one copy per guidance context in the batch."""

    def __init__(self, unet, known: Known):
        self.unet, self.known = unet, known

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        masked = self.known.masked_latents
        copies = sample.shape[0] // masked.shape[0]
        mask = self.known.mask.expand(sample.shape[0], -1, -1, -1)
        return self.unet(torch.cat([sample, mask, masked.repeat(copies, 1, 1, 1)], dim=1), timestep,
                         encoder_hidden_states=encoder_hidden_states, **kwargs)


class KeepKnown:
    """A step hook for 4-channel UNets: after each step, the known region is the picture's latents noised
    to the next timestep (clean after the last), so the model only draws the masked part."""

    def __init__(self, known: Known, scheduler, timesteps: torch.Tensor):
        self.known, self.scheduler, self.timesteps = known, scheduler, timesteps

    def __call__(self, state: StepState) -> None:
        known = self.known.image_latents
        if state.step < len(self.timesteps) - 1:
            next_t = self.timesteps[state.step + 1].reshape(1)
            known = self.scheduler.add_noise(known, self.known.noise, next_t)
        mask = self.known.mask
        state.latents = (1 - mask) * known + mask * state.latents


def paste_back(work: Region, generated: np.ndarray, blur: int) -> np.ndarray:
    """The drawn pixels (B, h, w, 3) in [0, 1] put back into the whole picture through the softened mask.

    Returns:
        (B, H, W, 3) in [0, 1] at the picture's size; 0 weight (outside the mask and its band) keeps
        the picture's own pixels exactly. Without a picture, `generated` as it is.
    """
    if work.picture is None:  # going on from latents without `original_image`: the decoded pixels, as diffusers'
        return generated
    original = np.asarray(work.picture, dtype=np.float32) / 255.0
    weights = masks.soft(work.mask, blur)
    if work.box is None:
        if generated.shape[1:3] != original.shape[:2]:  # drawn at another size than the picture
            original = np.asarray(work.work_picture, dtype=np.float32) / 255.0
            weights = masks.soft(work.work_mask, blur)
        return masks.paste(generated, original, weights)
    left, top, right, bottom = work.box
    placed = np.repeat(original[None], generated.shape[0], axis=0)
    for i, frame in enumerate(generated):
        crop = PIL.Image.fromarray(np.round(frame * 255).astype(np.uint8)).resize((right - left, bottom - top),
                                                                                 resample=PIL.Image.LANCZOS)
        placed[i, top:bottom, left:right] = np.asarray(crop, dtype=np.float32) / 255.0
    inside = np.zeros_like(weights)
    inside[top:bottom, left:right] = 1.0
    return masks.paste(placed, original, weights * inside)
