"""Train a diffusers `AutoencoderKL` for perceptual compression (Rombach et al. 2022, section 3).

The loss is reconstruction (L1 + MSE in pixels) plus a small KL term that keeps the latent
space close to a unit Gaussian, so that it is smooth enough to diffuse in. The latent
`scaling_factor` is measured on the data afterwards and stored in the VAE config, as SD's is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import data
from .loop import LoopConfig, train


@dataclass
class VaeConfig:
    """What to train and on what."""

    loop: LoopConfig
    data: str = "shapes"
    max_objects: int = 2  # shapes data: scenes of up to 2 objects (the bundled model) or 3
    image_size: int = 64
    model: dict = field(default_factory=dict)  # diffusers AutoencoderKL settings
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    scale_samples: int = 512  # images used to measure the latent scaling factor


class VaeObjective(torch.nn.Module):
    """The VAE with its loss as `forward`, so that DistributedDataParallel sees one call per step."""

    def __init__(self, vae: AutoencoderKL, config: VaeConfig):
        super().__init__()
        self.vae, self.config = vae, config

    def forward(self, pixels: torch.Tensor, generator: torch.Generator):
        """Reconstruction + KL for one batch; returns (loss, metrics)."""
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator)).sample
        l1 = F.l1_loss(reconstruction, pixels)
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean()
        return l1 + self.config.mse_weight * mse + self.config.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}


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
    dataset = data.open_dataset(config.data, seed=config.loop.seed, max_objects=config.max_objects)
    objective = VaeObjective(AutoencoderKL(sample_size=config.image_size, **config.model), config)

    def loss_fn(models, step, generator, rank, world):
        indices = data.step_indices(len(dataset), step, config.loop.batch_size, config.loop.seed, rank, world)
        pixels, _ = data.batch(dataset, indices, config.image_size)
        return models["vae"](pixels, generator)

    vae = train(config.loop, {"vae": objective}, loss_fn, resume=resume, progress=progress, name="vae")["vae"].vae
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae, dataset, config))
    vae.save_pretrained(Path(config.loop.output_dir) / "model")
    return vae
