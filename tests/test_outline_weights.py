"""The UNet stage's outline-weighted loss (`edge_weight`): which latent cells weigh more, and how."""

from types import SimpleNamespace

import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from diffusers import DDPMScheduler

from ldm_pipeline.training import data
from ldm_pipeline.training.loop import LoopConfig
from ldm_pipeline.shapes import BACKGROUND, COLOURS
from ldm_pipeline.training.unet import UnetConfig, outline_weights, unet_loss


def square(colour):
    image = PIL.Image.new("RGB", (64, 64), BACKGROUND)
    if colour is not None:
        PIL.ImageDraw.Draw(image).rectangle((18, 18, 41, 41), fill=COLOURS[colour])  # pixels 18..41
    return image


def test_cells_on_an_outline_weigh_more_whatever_the_contrast():
    pixels = data.pixels([square("purple"), square("white"), square(None)], 64)
    weights = outline_weights(pixels, (16, 16), 4.0)
    assert weights.shape == (3, 1, 16, 16)
    purple, white, flat = weights[:, 0]
    assert torch.equal(flat, torch.ones(16, 16))
    # purple is the colour nearest the background, white far from it: the same cells weigh the same
    assert torch.equal(purple, white)
    assert set(purple.unique().tolist()) == {1.0, 5.0}
    # the outline runs through pixels 17-18 and 41-42 (a gradient on either side of a step): cells 4 and 10
    outline = torch.zeros(16, 16, dtype=torch.bool)
    for edge in (4, 10):
        outline[edge, 4:11] = outline[4:11, edge] = True
    assert torch.equal(purple == 5.0, outline)


class Constant(torch.nn.Module):
    """A stand-in UNet that predicts a fixed tensor."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, noisy, timesteps, encoder_hidden_states=None):
        return SimpleNamespace(sample=self.prediction)


def test_weights_move_the_loss_between_cells_and_keep_its_scale():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    unet = Constant(torch.zeros(2, 4, 8, 8))  # the error is then the noise itself

    def loss(weights=None):
        return unet_loss(unet, scheduler, latents, context, torch.Generator().manual_seed(0), weights=weights)

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))  # unet_loss's first draw
    assert loss() == pytest.approx(noise.square().mean().item(), rel=1e-6)
    assert loss(torch.full((2, 1, 8, 8), 3.0)) == pytest.approx(loss().item(), rel=1e-6)
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, 0, 0] = 9.0  # the first cell weighs as much as eight others
    per_image = (weights * noise.square()).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * 4)
    assert loss(weights) == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert loss(weights) != pytest.approx(loss().item(), rel=1e-3)


@pytest.mark.parametrize("value", [-1.0, "4"])
def test_a_bad_edge_weight_is_named(value, tmp_path):
    with pytest.raises(ValueError, match=r"`edge_weight`: got .*; expected a number >= 0"):
        UnetConfig(loop=LoopConfig(output_dir=str(tmp_path)), edge_weight=value)
