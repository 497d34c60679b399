"""Live previews: a cheap picture of the latents, made by a linear map instead of the VAE's decoder.

A `PreviewMap` turns each latent cell's C channels (plus a bias) into one RGB colour, a (3, C + 1)
matrix, and enlarges the result to the image's size with bilinear interpolation. It is fitted by
least squares to the VAE decoder's own output: latents are decoded, the decoded pixels are
averaged over the f x f block each latent cell covers, and the map is the linear fit of those
colours from the cells' channels. A preview of a batch costs one tiny matrix product, against a
full decoder pass.

Which latents it is fitted on matters (the decoder is far from linear): the bundled model ships
one fitted on its own latents (final and mid-loop predicted x_0 of its prompts) in
`models/shapes/preview.json`; any other VAE gets one fitted on first use on synthetic pictures
(flat colours, smooth colour fields, random shapes) encoded by that VAE, cached on disk under
a digest of the VAE's weights (`$LDM_CACHE_DIR/previews`, else `~/.cache/ldm_pipeline/previews`)
and kept in memory per VAE while its weights stay the same.

In a pipeline call, `preview=callback` hands the callback, every `preview_every` steps and after
the last, one PIL image per image of the batch: the preview of the predicted clean latents x_0
(`sampling.StepState.denoised`), not of the noisy latents. The loop's pixels do not change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from ..provenance.hashes import hash_state, weights_state
from ..fast.compile import cache_root
from ..files import atomic_path

FORMAT = 1  # bump when the map's form or its fitting changes, so that cached maps are refitted
STORED = sorted((Path(__file__).parents[1] / "models").glob("*/preview.json"))  # maps shipped with bundled models
DEFAULT_EVERY = 5

PreviewCallback = Callable[[list[PIL.Image.Image]], object]


@dataclass
class PreviewMap:
    """Diffusion latents (B, C, h, w) -> approximate pixels (B, 3, h * factor, w * factor) in [-1, 1]."""

    weight: torch.Tensor  # (3, C): each RGB value from the cell's C latent channels
    bias: torch.Tensor  # (3,)
    factor: int  # pixels per latent cell per side (the VAE's scale factor)
    fingerprint: str  # `fingerprint(vae)` of the VAE it was fitted to
    fitted_on: str = ""  # what latents it was fitted on, in words

    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) diffusion latents (as the loop holds them) -> (B, 3, H, W) float32 in [-1, 1]."""
        latents = torch.nan_to_num(latents.float(), nan=0.0, posinf=0.0, neginf=0.0)
        weight, bias = self.weight.to(latents.device), self.bias.to(latents.device)
        colours = torch.einsum("rc,bchw->brhw", weight, latents) + bias[None, :, None, None]
        return F.interpolate(colours, scale_factor=self.factor, mode="bilinear", align_corners=False).clamp(-1, 1)

    def images(self, latents: torch.Tensor) -> list[PIL.Image.Image]:
        """(B, C, h, w) diffusion latents -> B RGB PIL images of the full image size."""
        return to_pil(self.pixels(latents))

    def to_json(self) -> dict:
        return dict(format=FORMAT, fingerprint=self.fingerprint, factor=self.factor, fitted_on=self.fitted_on,
                    weight=self.weight.tolist(), bias=self.bias.tolist())

    @classmethod
    def from_json(cls, data: dict) -> "PreviewMap":
        return cls(weight=torch.tensor(data["weight"], dtype=torch.float32),
                   bias=torch.tensor(data["bias"], dtype=torch.float32), factor=int(data["factor"]),
                   fingerprint=data["fingerprint"], fitted_on=data.get("fitted_on", ""))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as JSON, atomically (temporary file, then rename). Returns the path."""
        with atomic_path(path) as partial:
            partial.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)


def load(path: str | os.PathLike) -> PreviewMap | None:
    """The map stored at `path`, or None when the file is missing, unreadable or of another format."""
    try:
        data = json.loads(Path(path).read_text())
        return PreviewMap.from_json(data) if data.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def to_pil(pixels: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) pixels in [-1, 1] -> B RGB PIL images (rounded as the pipeline rounds its output)."""
    array = ((pixels.float().clamp(-1, 1) / 2 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(frame) for frame in array]


# -- which VAE ---------------------------------------------------------------------------------


def scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def fingerprint(vae) -> str:
    """A digest (32 hex) of the VAE's weights (names, shapes, values as fp32, so the device and casting
    fp16 weights up do not matter) and its scaling factor, which the map's input carries."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format {FORMAT}; scaling_factor {float(vae.config.scaling_factor)!r};".encode())
    hash_state(digest, vae.state_dict())
    return digest.hexdigest()


# -- fitting -----------------------------------------------------------------------------------


def synthetic_pictures(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """`count` varied (3, size, size) pictures in [-1, 1]: flat colours or smooth colour fields,
    with up to three ellipses, rectangles or triangles of random colours on top."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        if rng.random() < 0.4:
            picture = PIL.Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        else:
            cells = int(rng.integers(2, 5))
            field = rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8)
            picture = PIL.Image.fromarray(field).resize((size, size), PIL.Image.BICUBIC)
        draw = PIL.ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(0, 4))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x, y = rng.uniform(-0.1, 0.9, 2) * size
            w, h = rng.uniform(0.1, 0.6, 2) * size
            kind = rng.integers(3)
            if kind == 0:
                draw.ellipse([x, y, x + w, y + h], fill=colour)
            elif kind == 1:
                draw.rectangle([x, y, x + w, y + h], fill=colour)
            else:
                draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=colour)
        pictures.append(np.asarray(picture))
    array = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float()
    return array / 127.5 - 1


def _weight_of(vae) -> torch.Tensor:
    return next(vae.parameters())


@torch.no_grad()
def encode_pictures(vae, pixels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] -> (N, C, h, w) diffusion latents (posterior means times the scaling factor)."""
    weight = _weight_of(vae)
    means = [vae.encode(pixels[i:i + batch].to(weight.device, weight.dtype)).latent_dist.mean.float()
             for i in range(0, len(pixels), batch)]
    return torch.cat(means) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """(N, C, h, w) diffusion latents -> (N, 3, H, W) float32 pixels in [-1, 1], the VAE's real decode."""
    weight = _weight_of(vae)
    pixels = [vae.decode(latents[i:i + batch].to(weight.device, weight.dtype) / vae.config.scaling_factor)
              .sample.float().clamp(-1, 1) for i in range(0, len(latents), batch)]
    return torch.cat(pixels)


@torch.no_grad()
def fit(vae, latents: torch.Tensor | None = None, count: int = 256, seed: int = 0,
        fitted_on: str | None = None) -> PreviewMap:
    """Fit a `PreviewMap` to the VAE's decoder by least squares.

    Args:
        latents: (N, C, h, w) diffusion latents to fit on (best: the model's own, e.g. final and
            mid-loop predicted x_0 of a few prompts). None: `count` synthetic pictures of
            16 x 16 latent cells, encoded by the VAE.
        fitted_on: a note of what the latents were, stored with the map.

    Returns:
        The map; the fit is `argmin_W sum |W [z; 1] - pooled decode|^2` over every latent cell,
        with a tiny ridge term so that a channel the latents never vary still gets a finite weight.
    """
    factor = scale_factor(vae)
    if latents is None:
        latents = encode_pictures(vae, synthetic_pictures(count, 16 * factor, seed))
        fitted_on = fitted_on or f"{count} synthetic pictures (seed {seed}) encoded by the VAE"
    latents = latents.float()
    colours = F.avg_pool2d(decode(vae, latents).cpu(), factor)  # (N, 3, h, w): the decode per latent cell
    channels = latents.shape[1]
    inputs = latents.cpu().permute(0, 2, 3, 1).reshape(-1, channels).double()
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    targets = colours.permute(0, 2, 3, 1).reshape(-1, 3).double()
    gram = inputs.T @ inputs + 1e-6 * len(inputs) * torch.eye(channels + 1, dtype=torch.float64)
    solution = torch.linalg.solve(gram, inputs.T @ targets).T.float()  # (3, C + 1)
    return PreviewMap(weight=solution[:, :channels].contiguous(), bias=solution[:, channels].contiguous(),
                      factor=factor, fingerprint=fingerprint(vae), fitted_on=fitted_on or f"{len(latents)} latents")


def fidelity(preview: PreviewMap, vae, latents: torch.Tensor) -> dict:
    """How close the preview is to the VAE's real decode of `latents` (N, C, h, w), in uint8 pixels.

    Returns:
        {"psnr": dB, "mae": mean absolute error in 0-255, "correlation": [r, g, b] Pearson
        correlation per channel, "images": N}.
    """
    def as_uint8(pixels):
        return ((pixels.float().clamp(-1, 1) / 2 + 0.5) * 255).round().cpu().double()

    real, approx = as_uint8(decode(vae, latents)), as_uint8(preview.pixels(latents))
    mse = float(((real - approx) ** 2).mean())
    correlation = []
    for channel in range(3):
        a, b = real[:, channel].flatten(), approx[:, channel].flatten()
        a, b = a - a.mean(), b - b.mean()
        denominator = float(a.norm() * b.norm())
        correlation.append(round(float(a @ b) / denominator, 3) if denominator > 0 else float("nan"))
    return dict(psnr=round(10 * math.log10(255**2 / mse), 2) if mse > 0 else float("inf"),
                mae=round(float((real - approx).abs().mean()), 2), correlation=correlation, images=len(latents))


# -- finding a map -----------------------------------------------------------------------------

_in_memory: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # vae -> (weights state, map)


def map_for(vae, cache_dir: str | os.PathLike | None = None, stored: list[Path] | None = None) -> PreviewMap:
    """The preview map of this VAE: from memory while its weights are unchanged, else a stored map
    with its fingerprint (`stored`: default the bundled models' `preview.json`), else the disk cache,
    else fitted now (seconds on a CPU for small VAEs, longer for Stable Diffusion's) and cached."""
    state = weights_state(vae)
    known = _in_memory.get(vae)
    if known is not None and known[0] == state:
        return known[1]
    key = fingerprint(vae)
    preview = next((m for m in map(load, STORED if stored is None else stored) if m and m.fingerprint == key), None)
    if preview is None:
        cached = cache_root(cache_dir, "previews") / f"{key}.json"
        preview = load(cached)
        if preview is None or preview.fingerprint != key:
            preview = fit(vae)
            preview.save(cached)
    _in_memory[vae] = (state, preview)
    return preview


# -- in the loop -------------------------------------------------------------------------------


def check_preview(preview, preview_every) -> None:
    """Refuse bad preview arguments before any work."""
    if preview is not None and not callable(preview):
        raise TypeError(f"`preview`: got {type(preview).__name__}; expected None or a callable that receives "
                        "a list of PIL images")
    if isinstance(preview_every, bool) or not isinstance(preview_every, (int, np.integer)) or preview_every < 1:
        raise ValueError(f"`preview_every`: got {preview_every!r}; expected an integer >= 1 (steps between previews)")


class PreviewHook:
    """A step hook (`sampling.denoise(hooks=...)`) that shows the predicted x_0 every `every` steps and
    after the last of `total` steps. Each image's `info` carries "step" (1-based) and "timestep"."""

    def __init__(self, preview: PreviewMap, callback: PreviewCallback, every: int, total: int):
        self.preview, self.callback, self.every, self.total = preview, callback, int(every), int(total)

    def __call__(self, state) -> None:
        done = state.step + 1
        if done % self.every and done != self.total:
            return None
        images = self.preview.images(state.denoised())
        for image in images:
            image.info.update(step=done, timestep=float(state.timestep))
        self.callback(images)
        return None  # a preview never stops the loop


def hooks_for(vae, preview: PreviewCallback | None, every: int, total: int) -> list[PreviewHook]:
    """The pipeline's preview hook for a call (none when `preview` is None)."""
    return [] if preview is None else [PreviewHook(map_for(vae), preview, every, total)]


def strip(frames: list[list[PIL.Image.Image]], pad: int = 2) -> PIL.Image.Image:
    """Previews gathered over a call as one picture: a row per image of the batch, a column per preview.

    Args:
        frames: what the preview callback received, in order (each a list of B images).
    """
    if not frames:
        raise ValueError("`frames`: got no previews; expected at least one list of images")
    rows, cols = len(frames[0]), len(frames)
    w, h = frames[0][0].size
    sheet = PIL.Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for col, images in enumerate(frames):
        for row, image in enumerate(images):
            sheet.paste(image, (col * (w + pad), row * (h + pad)))
    return sheet


def save_strip(frames: list[list[PIL.Image.Image]], path: str | os.PathLike) -> Path:
    """`strip(frames)` written to the PNG `path` atomically (a temporary file, then a rename). Returns the path."""
    with atomic_path(path) as partial:
        strip(frames).save(partial, format="PNG")
    return Path(path)
