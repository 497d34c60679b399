"""Tiny Stable-Diffusion-shaped components, built offline, shared by the tests."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_pipeline import LatentDiffusionPipeline, LatentDiffusionXLPipeline
from ldm_pipeline.shapes.tokenizer import build_clip_tokenizer
from sdxl_components import REFINER, build_xl_parts

torch.set_num_threads(1)

CAPTIONS = ["a red circle in the top left", "a small blue square in the center",
            "an orange triangle in the bottom right and a large green circle in the top left",
            "a photo of a cat", "a painting of a house by the sea"]

# SD 1.x scheduler settings (scaled-linear betas over 1000 steps, epsilon prediction)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(CAPTIONS, 600, tmp_path_factory.mktemp("tokenizer"))


def _build_components(tokenizer):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=16, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77,
    ))
    for model in (unet, vae, text_encoder):
        model.eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                scheduler=DDIMScheduler(**SD_SCHEDULER))


@pytest.fixture(scope="session")
def _session_components(tokenizer):
    return _build_components(tokenizer)


@pytest.fixture
def components(_session_components):
    """A fresh deep copy each test, so that no test can leak changes into another."""
    return copy.deepcopy(_session_components)


@pytest.fixture
def pipe(components):
    return LatentDiffusionPipeline(**components)


@pytest.fixture
def loaded_pipelines(monkeypatch):
    """Every pipeline `LatentDiffusionPipeline.from_pretrained` returns during the test, in order (a
    training stage's in-memory models, to compare with what it wrote)."""
    loaded = []
    real = LatentDiffusionPipeline.from_pretrained.__func__

    def watched(cls, *args, **kwargs):
        loaded.append(real(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", classmethod(watched))
    return loaded


@pytest.fixture
def model(pipe, tmp_path):
    """The tiny pipeline saved as a model folder (tmp_path / "model"), for the CLI and anything that loads one."""
    return pipe.save_pretrained(tmp_path / "model")


# -- SDXL (tests/sdxl_components.py builds them) -------------------------------------------------

@pytest.fixture(scope="session")
def _xl_parts(tokenizer, tmp_path_factory):
    return build_xl_parts(tokenizer, tmp_path_factory.mktemp("tokenizer_2"))


@pytest.fixture
def base_parts(_xl_parts):
    """A tiny SDXL base's components, a fresh copy each test."""
    return copy.deepcopy(_xl_parts[0])


@pytest.fixture
def refiner_parts(_xl_parts):
    """A tiny SDXL refiner's components (the second tower only), a fresh copy each test."""
    return copy.deepcopy(_xl_parts[1])


@pytest.fixture
def base(base_parts):
    return LatentDiffusionXLPipeline(**base_parts)


@pytest.fixture
def refiner(refiner_parts):
    return LatentDiffusionXLPipeline(**refiner_parts, **REFINER)
