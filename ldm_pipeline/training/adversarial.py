"""An adversarial term for distillation: a small patch discriminator tells the teacher's images from the
student's one-step images, and the student learns to draw images it cannot tell apart.

Why: a one-step student that regresses onto the teacher's images (the one-step term of `lcm.py`)
learns their average where it cannot follow the teacher exactly, and an average of sharp edges is a
soft edge. A discriminator penalises softness itself, wherever it is (as adversarial diffusion
distillation does). Both players train in the one optimiser of the shared loop, on one summed loss:
the discriminator's hinge loss sees the student's images detached, and the student's loss sees the
discriminator's weights detached, so each gradient reaches only its own player.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> (B, 1, H/8, W/8) logits, one per overlapping patch: three
    stride-2 convolutions and a 3x3 head, spectrally normalised (any image size a multiple of 8)."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        layers, previous = [], channels
        for out in (width, 2 * width, 4 * width):
            layers += [spectral_norm(nn.Conv2d(previous, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            previous = out
        layers.append(spectral_norm(nn.Conv2d(previous, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_losses(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's loss, the discriminator's loss) of the hinge game, each with gradients for its own
    player only: `fake` (the student's images) keeps its graph in the first, the discriminator's
    parameters receive gradients from the second alone."""
    inner = getattr(discriminator, "module", discriminator)  # under DistributedDataParallel
    frozen = {name: p.detach() for name, p in inner.named_parameters()}
    student = -functional_call(inner, frozen, (fake.float(),)).mean()
    judged = discriminator(torch.cat([real.detach().float(), fake.detach().float()]))
    real_logits, fake_logits = judged[:real.shape[0]], judged[real.shape[0]:]
    critic = torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()
    return student, critic
