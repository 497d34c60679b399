"""LoRA files: finding one (a file, a folder, a Hub repository), reading its tensors safely, naming its modules.

Both formats diffusers reads are accepted: diffusers' own (`unet.` and `text_encoder.` keys) and kohya's
(`lora_unet_...`, `lora_te_...`, with `lora_down`, `lora_up` and `alpha`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from ..loading.folders import is_hub_id

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
# suffixes that end a LoRA module's name in the formats diffusers reads
_SUFFIXES = re.compile(r"\.(lora_down|lora_up|lora_A|lora_B|lora_linear_layer\.(down|up)|lora\.(down|up)|"
                       r"lora_mid|alpha|hada_\w+|lokr_\w+|dora_scale|diff|diff_b)(\.[^.]+)*$|\.(alpha|dora_scale)$")


def lora_file(source, weight_name: str | None = None) -> Path:
    """The LoRA file a path names: the file itself, or inside a folder `weight_name`, else
    diffusers' `pytorch_lora_weights.safetensors`, else the folder's only .safetensors file."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir() and is_hub_id(str(source)):
        return from_hub(str(source), weight_name or LORA_WEIGHT_NAME)
    if not path.is_dir():
        raise FileNotFoundError(f"`path_or_folder`: {str(source)!r} is neither a LoRA file nor a folder, nor a Hub "
                                "id (owner/name)")
    if weight_name is not None:
        if not (path / weight_name).is_file():
            raise FileNotFoundError(f"`weight_name`: no {weight_name!r} in {str(path)!r}")
        return path / weight_name
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise FileNotFoundError(f"`path_or_folder`: {str(path)!r} has no {LORA_WEIGHT_NAME} and not exactly one "
                                f".safetensors file (found: {found}); pass weight_name=")
    return candidates[0]


def from_hub(repo: str, weight_name: str, argument: str = "path_or_folder") -> Path:
    """A file of a Hub repository (a LoRA's, such as "latent-consistency/lcm-lora-sdv1-5", or an embedding's),
    downloaded or from the cache; errors name `argument`."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, weight_name))
    except Exception as error:  # unreachable, unknown, gated, no such file: huggingface_hub has many error types
        raise FileNotFoundError(
            f"`{argument}`: cannot load {weight_name!r} of {repo!r} from the Hugging Face Hub "
            f"({type(error).__name__}): it is unreachable, or has no such repository or file, and it is not in "
            "the local cache; pass a local file or folder, or weight_name= for another file") from error


def read_state_dict(source, weight_name: str | None = None, allow_pickle: bool = False
                    ) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """A LoRA's tensors, its file (None for a dict) and the file's SHA-256."""
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad or not source:
            raise ValueError(f"`path_or_folder`: a state dict must map key strings to tensors "
                             f"({'empty' if not source else f'{len(bad)} bad entries, e.g. {bad[0]!r}'})")
        return dict(source), None, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`path_or_folder`: got {type(source).__name__}; expected a LoRA file, a folder or a "
                        "state dict")
    path = lora_file(source, weight_name)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if path.suffix in PICKLED:
        if not allow_pickle:
            raise ValueError(f"`path_or_folder`: {str(path)!r} is a pickle, which can run code when loaded; "
                             "convert it to .safetensors, or pass allow_pickle=True to read it with "
                             "torch.load(weights_only=True)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    else:
        from safetensors.torch import load

        try:
            state = load(data)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"`path_or_folder`: {str(path)!r} is not a readable safetensors file ({error})") from None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, str(path.resolve()), sha


def file_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a LoRA file adapts, as the file spells them (kohya or diffusers style)."""
    names = {_SUFFIXES.sub("", key) for key in state}
    return sorted(n for n in names if n)
