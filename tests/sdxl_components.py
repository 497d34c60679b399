"""Tiny random SDXL-shaped components (a base and a refiner) and helpers to compare with diffusers' SDXL
pipelines; the fixtures that hand them to tests are in conftest.py."""

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading", num_train_timesteps=1000)
TIME_DIM, PROJECTION = 8, 16  # the UNet's per-id time embedding, the second tower's projection
REFINER = dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)  # a refiner's settings


def _text_config(tokenizer, hidden, **extra):
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer),
                          max_position_embeddings=77, hidden_act="gelu", **extra)


def _unet(cross_attention_dim: int, time_ids: int):
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, transformer_layers_per_block=(1, 2), norm_num_groups=16,
        projection_class_embeddings_input_dim=TIME_DIM * time_ids + PROJECTION, cross_attention_dim=cross_attention_dim)


def build_xl_parts(tokenizer, folder) -> tuple[dict, dict]:
    """A base (two towers, widths 32 and 24, 6 time ids) and a refiner (second tower only, 5 time ids with the
    aesthetic score); `folder` takes the second tokenizer, which pads with "!" as SDXL's does."""
    tokenizer.save_pretrained(folder)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token="!")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 24, projection_dim=PROJECTION))
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16, force_upcast=True)
    base = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                text_encoder_2=text_encoder_2, vae=vae, unet=_unet(32 + 24, 6),
                scheduler=EulerDiscreteScheduler(**SCHEDULER))
    refiner = dict(tokenizer=None, text_encoder=None, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
                   vae=vae, unet=_unet(24, 5), scheduler=EulerDiscreteScheduler(**SCHEDULER))
    for model in (text_encoder, text_encoder_2, vae, base["unet"], refiner["unet"]):
        model.eval()
    return base, refiner


def theirs(cls, parts, **config):
    """A diffusers pipeline `cls` on `parts`, without its progress bar."""
    pipe = cls(**parts, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeds(first: int, count: int):
    """One generator per image, seeded as ours seeds image i: first + i."""
    return [torch.Generator().manual_seed(first + i) for i in range(count)]


def close(mine, reference):
    """Pixels within 1/255 of each other."""
    assert np.abs(np.asarray(mine, dtype=np.float64) - np.asarray(reference, dtype=np.float64)).max() <= 1 / 255
