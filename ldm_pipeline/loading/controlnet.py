"""ControlNets from disk or the Hub: diffusers `ControlNetModel` folders, and original single files.

A folder (or a Hub id) holds `config.json` and `diffusion_pytorch_model.safetensors`, as diffusers
writes them. A single file in the original layout (`control_model.` keys, as the ControlNet authors
and sd-webui-controlnet ship them) carries weights only: its architecture comes from the Stable
Diffusion UNet config in `configs/` that its cross-attention width names (SD 1.x: 768, SD 2.x: 1024),
or from `config=`, and diffusers' single-file loader converts it, offline.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .folders import ModelFileError, check_safetensors, load_part, read_json, resolve_model_dir

CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
WIDTHS = {768: "sd15", 1024: "sd21"}  # cross-attention width -> the configs/ folder of that UNet


def load_controlnet(path_or_id: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                    config: str | os.PathLike | None = None):
    """A diffusers `ControlNetModel` from a folder, a Hub id or an original single `.safetensors` file.

    Args:
        torch_dtype: the weights' dtype (default: as stored).
        config: for a single file: a folder with the ControlNet's `config.json`, or "sd15" / "sd21"
            (default: guessed from the file's cross-attention width).

    The returned net carries `ldm_name` (the folder, file or Hub id it came from) for recipes.
    """
    from diffusers import ControlNetModel

    path = Path(path_or_id).expanduser()
    if path.is_file():
        net = _single_file(path, torch_dtype, config)
    else:
        folder = resolve_model_dir(path_or_id, patterns=CONTROLNET_PATTERNS)
        if not (folder / "config.json").is_file():
            raise ValueError(f"`controlnet`: {str(path_or_id)!r} is neither a ControlNet folder (with config.json) "
                             "nor a .safetensors file nor a Hub id")
        read_json(folder / "config.json")
        weights = folder / "diffusion_pytorch_model.safetensors"
        if weights.is_file():
            check_safetensors(weights)
        net = load_part(folder, "the ControlNet", lambda: ControlNetModel.from_pretrained(
            folder, torch_dtype=torch_dtype, use_safetensors=True, local_files_only=True))
    net.ldm_name = path.resolve().name if path.exists() else str(path_or_id)
    return net.eval()


def _single_file(path: Path, torch_dtype, config):
    from diffusers import ControlNetModel

    if path.suffix != ".safetensors":
        raise ValueError(f"`controlnet`: {str(path)!r} is not a .safetensors file; ControlNets load from "
                         "safetensors (or a diffusers folder)")
    shapes = check_safetensors(path)
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(config) if config is not None and Path(config).is_dir() else \
            _config_folder(config or guess_config(path, shapes), Path(staging))
        return load_part(path, "the ControlNet file", lambda: ControlNetModel.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype))


def guess_config(path: Path, shapes: dict[str, tuple]) -> str:
    """"sd15" or "sd21", read off the width of the ControlNet's cross-attention in an original file."""
    keys = [k for k in shapes if k.startswith("control_model.") and k.endswith("attn2.to_k.weight")]
    if not keys:
        raise ModelFileError(path, "holds no ControlNet cross-attention weights (control_model.*.attn2.to_k); is it "
                                   "a ControlNet in the original layout? Pass config= to say what it is")
    width = shapes[keys[0]][1]
    if width not in WIDTHS:
        raise ModelFileError(path, f"has cross-attention width {width}, neither SD 1.x (768) nor SD 2.x (1024); pass "
                                   "config= with a folder holding the ControlNet's config.json")
    return WIDTHS[width]


def _config_folder(name: str, staging: Path) -> Path:
    """A folder with the config.json of a ControlNet for the named SD UNet (what `ControlNetModel.from_unet`
    makes of it), built on the meta device: no weights are allocated."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from .single_file import config_dir

    unet_config = UNet2DConditionModel.load_config(config_dir(name) / "unet")
    with torch.device("meta"):
        net = ControlNetModel.from_unet(UNet2DConditionModel.from_config(unet_config))
    (staging / "config.json").write_text(json.dumps(dict(net.config), default=list))
    return staging
