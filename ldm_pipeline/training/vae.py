"""Train a diffusers `AutoencoderKL` for perceptual compression (Rombach et al. 2022, section 3).

The loss is reconstruction (L1 + MSE in pixels) plus a small KL term that keeps the latent
space close to a unit Gaussian, so that it is smooth enough to diffuse in. The latent
`scaling_factor` is measured on the data afterwards and stored in the VAE config, as SD's is.

A stage may also start from a trained VAE (`init`) and train only its decoder
(`train_encoder: false`), as Stable Diffusion's own decoder fine-tunes were made: the encoder and
so every latent stay as they were, and a UNet trained on them keeps working with the new decoder.
`edge_weight` puts more of the reconstruction loss on the pixels at edges, where a small VAE
rounds corners and blurs outlines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import data
from .loop import LoopConfig, check_stage_folder, train


@dataclass
class VaeConfig:
    """What to train and on what."""

    loop: LoopConfig
    data: str = "shapes"
    max_objects: int = 2  # shapes data: scenes of up to 2 objects (the bundled model) or 3
    split: str = "train"  # shapes data: "train" (no held-out pair) or "any" (images of every pair; no captions are used)
    image_size: int = 64
    model: dict = field(default_factory=dict)  # diffusers AutoencoderKL settings
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    edge_weight: float = 0.0  # extra loss weight per pixel: edge_weight * the target's gradient magnitude
    init: str = ""  # start from this AutoencoderKL folder instead of new weights (`model` is then ignored)
    train_encoder: bool = True  # False: only the decoder learns; latents (and the scaling factor) stay
    scale_samples: int = 512  # images used to measure the latent scaling factor

    def __post_init__(self):
        if not isinstance(self.train_encoder, bool):
            raise ValueError(f"`train_encoder`: got {self.train_encoder!r}; expected true or false")
        if not self.train_encoder and not self.init:
            raise ValueError("`train_encoder`: false needs `init`, the trained VAE whose decoder is fine-tuned")
        if not (isinstance(self.edge_weight, (int, float)) and self.edge_weight >= 0):
            raise ValueError(f"`edge_weight`: got {self.edge_weight!r}; expected a number >= 0")


def gradient_magnitude(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): |gradient| of the pixels (central differences, summed over channels); 0 on flat areas."""
    padded = F.pad(pixels, (1, 1, 1, 1), mode="replicate")
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return (dx.square() + dy.square()).sqrt().sum(dim=1, keepdim=True)


def edge_weights(pixels: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: 1 + edge_weight * `gradient_magnitude` of the target, so flat areas
    weigh 1 and outlines more."""
    return 1 + edge_weight * gradient_magnitude(pixels)


class VaeObjective(torch.nn.Module):
    """The VAE with its loss as `forward`, so that DistributedDataParallel sees one call per step."""

    def __init__(self, vae: AutoencoderKL, config: VaeConfig):
        super().__init__()
        self.vae, self.config = vae, config

    def forward(self, pixels: torch.Tensor, generator: torch.Generator):
        """Reconstruction + KL for one batch; returns (loss, metrics)."""
        with torch.set_grad_enabled(self.config.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator)
        reconstruction = self.vae.decode(latents).sample
        weights = edge_weights(pixels, self.config.edge_weight) if self.config.edge_weight else 1.0
        l1 = (weights * (reconstruction - pixels).abs()).mean()
        mse = (weights * (reconstruction - pixels).square()).mean()
        loss = l1 + self.config.mse_weight * mse
        if self.config.train_encoder:
            kl = posterior.kl().mean()
            return loss + self.config.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}
        return loss, {"l1": l1.item()}


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset, config: VaeConfig) -> float:
    """1 / std of posterior samples over the data, so diffusion sees latents of unit variance."""
    generator = torch.Generator().manual_seed(config.loop.seed)
    samples = []
    for start in range(0, config.scale_samples, 64):
        indices = list(range(start, min(start + 64, config.scale_samples, len(dataset))))
        if not indices:
            break
        pixels, _ = data.batch(dataset, indices, config.image_size)
        samples.append(vae.encode(pixels).latent_dist.sample(generator))
    return float(1.0 / torch.cat(samples).std())


def train_vae(config: VaeConfig, resume: bool = False, progress: bool = True) -> AutoencoderKL:
    """Train, measure the scaling factor, save in `output_dir/model` (diffusers layout) and return the VAE."""
    dataset = data.open_dataset(config.data, seed=config.loop.seed, max_objects=config.max_objects, split=config.split)
    if config.init:
        check_stage_folder("init", config.init)
        vae = AutoencoderKL.from_pretrained(config.init).float()
    else:
        vae = AutoencoderKL(sample_size=config.image_size, **config.model)
    if not config.train_encoder:
        for part in (vae.encoder, vae.quant_conv):
            if part is not None:
                part.requires_grad_(False)
    objective = VaeObjective(vae, config)

    def loss_fn(models, step, generator, rank, world):
        indices = data.step_indices(len(dataset), step, config.loop.batch_size, config.loop.seed, rank, world)
        pixels, _ = data.batch(dataset, indices, config.image_size)
        return models["vae"](pixels, generator)

    vae = train(config.loop, {"vae": objective}, loss_fn, resume=resume, progress=progress, name="vae")["vae"].vae
    if config.train_encoder:  # else the latents are the init's, and so is their scale
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, dataset, config))
    vae.save_pretrained(Path(config.loop.output_dir) / "model")
    return vae
