"""Original single-file Stable Diffusion checkpoints (.safetensors; pickles on request), read offline.

A single file carries weights only: the component configs come from the folders kept in
`configs/` (`sd15`, `sd21`), chosen by the width of the UNet's cross-attention, and the CLIP
vocabulary from `configs/clip_tokenizer`. The conversion itself is diffusers' single-file loader.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

from .folders import (COMPONENTS, PICKLE_SUFFIXES, ModelFileError, ModelNotFoundError, check_safetensors, is_hub_id,
                      load_part)


def config_root() -> Path:
    """The installed `configs/` folder (ldm_pipeline.configs)."""
    from importlib.resources import files

    return Path(str(files("ldm_pipeline.configs")))


def config_dir(name: str) -> Path:
    """The folder of a configuration kept in `configs/` (e.g. "sd15", "sd21")."""
    folder = config_root() / name
    if not (folder / "model_index.json").is_file():
        available = sorted(p.parent.name for p in config_root().glob("*/model_index.json"))
        raise ValueError(f"`config`: no configuration {name!r} in configs/; expected one of {available}")
    return folder


def guess_config(checkpoint_path: Path, shapes: dict[str, tuple] | None = None) -> str:
    """"sd15" or "sd21", read off the width of the UNet's cross-attention in a single-file checkpoint.

    `shapes` maps the checkpoint's keys to their shapes (read from the safetensors header when None).
    """
    shapes = check_safetensors(checkpoint_path) if shapes is None else shapes
    keys = [k for k in shapes if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")]
    if not keys:
        raise ValueError(f"`path`: {str(checkpoint_path)!r} is not a Stable Diffusion 1.x/2.x checkpoint "
                         "(no UNet cross-attention weights); pass config= to say what it is")
    width = shapes[keys[0]][1]
    known = {768: "sd15", 1024: "sd21"}
    if width not in known:
        raise ValueError(f"`path`: {str(checkpoint_path)!r} has cross-attention width {width}, neither SD 1.x (768) "
                         "nor SD 2.x (1024); pass config= naming a folder of component configs")
    return known[width]


def pickled_shapes(checkpoint: Path) -> dict[str, tuple]:
    """The tensor shapes of a pickled checkpoint, read with `torch.load(weights_only=True)` (memory-mapped where
    the file allows): only tensors and plain containers are rebuilt, no code the file names runs."""
    try:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the legacy, non-zip format
    except Exception as error:
        raise ModelFileError(checkpoint, f"cannot be loaded with torch.load(weights_only=True) ({type(error).__name__}"
                                         f": {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
                                         "); it is corrupt, or holds objects other than tensors") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(checkpoint, f"holds a {type(state).__name__}; expected a dict of tensors")
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def checkpoint_shapes(checkpoint: Path, allow_pickle: bool) -> dict[str, tuple]:
    """The tensor shapes of a single-file checkpoint, checked: a whole safetensors file, or a pickle only with
    `allow_pickle` (read with `torch.load(weights_only=True)`)."""
    if not checkpoint.is_file():
        raise ValueError(f"`path`: no file at {str(checkpoint)!r}")
    if checkpoint.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelFileError(checkpoint, "is a pickled checkpoint, which can run code when loaded; use its "
                                             ".safetensors version, or pass allow_pickle=True if you trust the file "
                                             "(it is then loaded with torch.load(weights_only=True))")
        return pickled_shapes(checkpoint)
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"`path`: {str(checkpoint)!r} is not a .safetensors file (or, with allow_pickle=True, "
                         f"one of {', '.join(PICKLE_SUFFIXES)})")
    return check_safetensors(checkpoint)


def bundled_clip_tokenizer(config: str | os.PathLike = "sd15", subfolder: str = "tokenizer") -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer, read offline from the vocabulary shipped in `configs/clip_tokenizer`.

    Stable Diffusion 1.x and 2.x share this BPE vocabulary (49,408 tokens; start 49406, end
    49407); their special tokens differ and come from `<config>/tokenizer/tokenizer_config.json`:
    SD 1.x pads with "<|endoftext|>" (49407), SD 2.x with "!" (id 0), as diffusers' SD 2 tokenizer does.

    Args:
        config: "sd15", "sd21" or a model folder whose tokenizer/tokenizer_config.json gives the special tokens.
        subfolder: the tokenizer's folder in it (SDXL's second tokenizer: "tokenizer_2", padding with "!").
    """
    folder = Path(config) if Path(config).is_dir() else config_dir(str(config))
    vocabulary = config_root() / "clip_tokenizer"
    with tempfile.TemporaryDirectory() as staging:
        # CLIPTokenizer reads plain files; the shipped ones are gzip-compressed (0.5 MB instead of 1.5 MB)
        for name in ("vocab.json", "merges.txt"):
            (Path(staging) / name).write_bytes(gzip.decompress((vocabulary / f"{name}.gz").read_bytes()))
        shutil.copy(folder / subfolder / "tokenizer_config.json", staging)
        return CLIPTokenizer.from_pretrained(staging)


def load_single_file(path: str | os.PathLike, config: str | None = None,
                     tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
                     torch_dtype: torch.dtype | None = None, allow_pickle: bool = False) -> dict:
    """Components from an original single-file Stable Diffusion checkpoint (.safetensors), offline.

    A pickled checkpoint (.ckpt, .pt, .pth, .bin) can run code when loaded, so it is refused
    unless `allow_pickle`; then it is read with `torch.load(weights_only=True)`, which rebuilds
    tensors only (diffusers' converter, which reads it again, does the same).

    Conversion is diffusers' single-file loader; component configs come from `configs/<config>`
    and the CLIP vocabulary, which the checkpoint does not carry, from `configs/clip_tokenizer`,
    so no network is needed. `tokenizer=` may instead be a tokenizer, a local tokenizer folder
    or a Hub id (downloaded, or read from the Hub cache).
    """
    from diffusers import StableDiffusionPipeline

    checkpoint = Path(path)
    shapes = checkpoint_shapes(checkpoint, allow_pickle)
    name = config or guess_config(checkpoint, shapes)
    folder = config_dir(name) if not Path(name).is_dir() else Path(name)
    if tokenizer is None:
        tokenizer = _config_tokenizer(folder)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _named_tokenizer(tokenizer)
    pipe = load_part(checkpoint, f"the checkpoint with the {folder.name!r} configs", lambda: (
        StableDiffusionPipeline.from_single_file(
            str(checkpoint), config=str(folder), local_files_only=True, torch_dtype=torch_dtype,
            tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False)))
    return {name: getattr(pipe, name) for name in COMPONENTS}


def _config_tokenizer(folder: Path):
    if (folder / "tokenizer" / "vocab.json").is_file() or (folder / "tokenizer" / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if not (folder / "tokenizer" / "tokenizer_config.json").is_file():
        raise ModelNotFoundError(f"`config`: {str(folder)!r} has no tokenizer/tokenizer_config.json; pass tokenizer=")
    return bundled_clip_tokenizer(folder)


TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # a CLIP tokenizer folder holds one of these


def _tokenizer_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "tokenizer"):  # a tokenizer repo, or a pipeline repo's tokenizer/
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    return None


def _named_tokenizer(name: str | os.PathLike):
    """A tokenizer from a local folder, or from a Hub id such as "openai/clip-vit-large-patch14".

    The vocabulary files are checked for first: transformers builds an empty tokenizer, without
    an error, from a folder or repo that has none.
    """
    local = Path(name).expanduser()
    if local.exists() or not is_hub_id(str(name)):
        folder = _tokenizer_folder(local) if local.is_dir() else None
        if folder is None:
            raise ValueError(f"`tokenizer`: {str(name)!r} is neither a tokenizer folder (with vocab.json or "
                             "tokenizer.json) nor a Hub id (owner/name)")
        return CLIPTokenizer.from_pretrained(folder)
    from huggingface_hub import snapshot_download

    patterns = [f"{prefix}{pattern}" for prefix in ("", "tokenizer/") for pattern in ("*.json", "*.txt")]
    try:
        folder = _tokenizer_folder(Path(snapshot_download(str(name), allow_patterns=patterns)))
    except Exception as error:  # unreachable, unknown, gated: huggingface_hub has many error types for these
        raise ModelNotFoundError(
            f"`tokenizer`: cannot load {str(name)!r} from the Hugging Face Hub ({type(error).__name__}): it is "
            "unreachable, or has no such repository, and it is not in the local cache. Leave tokenizer= unset to "
            "use the CLIP vocabulary shipped with ldm_pipeline (offline), or pass a local tokenizer folder"
        ) from error
    if folder is None:
        raise ModelNotFoundError(f"`tokenizer`: {str(name)!r} on the Hugging Face Hub holds no CLIP vocabulary "
                                 "(vocab.json or tokenizer.json, at the top or in tokenizer/)")
    return CLIPTokenizer.from_pretrained(folder)
