"""Original single-file SDXL checkpoints (base or refiner, .safetensors; pickles on request), read offline.

The original (Stability's `sgm`) layout keeps the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`, and the text towers under `conditioner.embedders.N.`: a base has CLIP ViT-L at
`conditioner.embedders.0.transformer.` (transformers' layout) and OpenCLIP ViT-bigG at
`conditioner.embedders.1.model.` (OpenCLIP's, with fused q/k/v); a refiner has only the OpenCLIP tower, at
`conditioner.embedders.0.model.`. The component configs come from `configs/sdxl` or
`configs/sdxl_refiner` (diffusers' SDXL 1.0 values), both tokenizers from the CLIP vocabulary shipped in
`configs/clip_tokenizer` (the second pads with "!"); the conversion is diffusers' single-file loader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .folders import load_part, read_json
from .single_file import bundled_clip_tokenizer, checkpoint_shapes, config_dir
from .xl_folders import SETTINGS, XL_COMPONENTS

BASE_TOWER = "conditioner.embedders.1.model."  # OpenCLIP as a base's second tower
REFINER_TOWER = "conditioner.embedders.0.model."  # ... as a refiner's only one


def guess_xl_config(checkpoint: Path, shapes: dict[str, tuple]) -> str:
    """"sdxl" or "sdxl_refiner", read off where the OpenCLIP tower's keys sit."""
    if any(key.startswith(BASE_TOWER) for key in shapes):
        return "sdxl"
    if any(key.startswith(REFINER_TOWER) for key in shapes):
        return "sdxl_refiner"
    raise ValueError(f"`path`: {str(checkpoint)!r} is not an SDXL checkpoint (no OpenCLIP text tower under "
                     f"{BASE_TOWER!r} or {REFINER_TOWER!r}); for SD 1.x/2.x use "
                     "LatentDiffusionPipeline.from_single_file")


def load_single_file_xl(path: str | os.PathLike, config: str | None = None, torch_dtype: torch.dtype | None = None,
                        allow_pickle: bool = False) -> tuple[dict, dict]:
    """Components of an original single-file SDXL checkpoint, and the pipeline settings of its config folder
    (`force_zeros_for_empty_prompt`, `requires_aesthetics_score`), with no network.

    Args:
        config: "sdxl", "sdxl_refiner" or a diffusers SDXL folder of configs; guessed from the keys when None.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    checkpoint = Path(path)
    shapes = checkpoint_shapes(checkpoint, allow_pickle)
    name = config or guess_xl_config(checkpoint, shapes)
    folder = Path(name) if Path(name).is_dir() else config_dir(str(name))
    index = read_json(folder / "model_index.json")
    refiner = not (isinstance(index.get("text_encoder"), list) and index["text_encoder"][1])
    tokenizers = {"tokenizer_2": bundled_clip_tokenizer(folder, "tokenizer_2")}
    tokenizers["tokenizer"] = None if refiner else bundled_clip_tokenizer(folder, "tokenizer")
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    extra = dict(text_encoder=None) if refiner else {}
    pipe = load_part(checkpoint, f"the checkpoint with the {folder.name!r} configs", lambda: cls.from_single_file(
        str(checkpoint), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **tokenizers, **extra))
    components = {part: getattr(pipe, part, None) for part in XL_COMPONENTS}
    settings = {key: bool(index.get(key, value)) for key, value in SETTINGS.items()}
    return components, settings
