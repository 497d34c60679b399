"""Random-weight components built from the configs in `configs/`, for tests and benchmarks.

A full-size Stable Diffusion 1.5 or 2.1 can be built offline this way: the right shapes and
costs, meaningless pictures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import folders as loading, single_file
from ..pipeline import LatentDiffusionPipeline
from ..shapes.tokenizer import save_clip_tokenizer, train_bpe


def byte_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with only the byte symbols (no merges): every text tokenises, one token per byte."""
    vocab, merges = train_bpe(["a"], vocab_size=514)
    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(save_clip_tokenizer(vocab, merges, folder, model_max_length))


def build_random(config: str | Path = "sd15", tokenizer: CLIPTokenizer | None = None, seed: int = 0,
                 torch_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
    """Components with random weights for a configuration in `configs/` ("sd15", "sd21") or a folder.

    Args:
        tokenizer: defaults to the real CLIP tokenizer (`single_file.bundled_clip_tokenizer`) with
            the configuration's special tokens.
        seed: seeds the weight initialisation.
        device: "meta" builds the modules without allocating weights (to count parameters).

    Returns:
        The five components, ready for `LatentDiffusionPipeline(**components)`.
    """
    folder = Path(config) if Path(config).is_dir() else single_file.config_dir(str(config))
    index = loading.check_model_dir(folder)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    scheduler_cls = loading.component_class(*index["scheduler"])
    components = dict(
        tokenizer=tokenizer or single_file.bundled_clip_tokenizer(folder),
        text_encoder=text_encoder, vae=vae, unet=unet,
        scheduler=scheduler_cls.from_pretrained(folder / "scheduler"),
    )
    if torch.device(device).type != "meta":
        for name in ("text_encoder", "vae", "unet"):
            components[name] = components[name].to(dtype=torch_dtype).eval()
    return components


def random_pipeline(config: str | Path = "sd15", **kwargs) -> LatentDiffusionPipeline:
    """`LatentDiffusionPipeline` on `build_random(config, **kwargs)`."""
    return LatentDiffusionPipeline(**build_random(config, **kwargs))
