"""Reading and writing models: the diffusers folder layout (local or Hub), single-file checkpoints.

A model folder is what diffusers writes: `model_index.json` naming each component's class,
and one subfolder per component (`tokenizer/`, `text_encoder/`, `vae/`, `unet/`,
`scheduler/`) with its config and safetensors weights.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

# component -> (library, the classes we accept, what the class must be an instance of)
COMPONENTS = {
    "tokenizer": ("transformers", PreTrainedTokenizerBase),
    "text_encoder": ("transformers", CLIPTextModel),
    "vae": ("diffusers", AutoencoderKL),
    "unet": ("diffusers", UNet2DConditionModel),
    "scheduler": ("diffusers", SchedulerMixin),
}
DEFAULTS_FILE = "ldm_pipeline.json"  # our generation defaults beside model_index.json; diffusers ignores it
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/model.safetensors",
                "*/diffusion_pytorch_model.safetensors", DEFAULTS_FILE]


class ModelNotFoundError(ValueError):
    """A model folder or Hub id that cannot be read."""


def component_class(library: str, name: str):
    module = diffusers if library == "diffusers" else __import__("transformers")
    cls = getattr(module, name, None)
    if cls is None:
        raise ModelNotFoundError(f"model_index.json names unknown class {library}.{name}")
    return cls


def check_components(components: dict) -> None:
    """Raise a TypeError naming any component that is missing or of the wrong kind."""
    for name, (_, base) in COMPONENTS.items():
        value = components.get(name)
        if not isinstance(value, base):
            raise TypeError(f"`{name}`: got {type(value).__name__}; expected a {base.__module__}.{base.__name__}")


def check_model_dir(path: Path) -> dict:
    """Check that `path` holds a complete model folder; return its model_index.json as a dict."""
    if not path.is_dir():
        raise ModelNotFoundError(f"model folder {str(path)!r} does not exist")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(f"model folder {str(path)!r} has no model_index.json; is it a diffusers folder?")
    index = json.loads(index_file.read_text())
    for name, (library, base) in COMPONENTS.items():
        entry = index.get(name)
        if not entry or entry[1] is None:
            raise ModelNotFoundError(f"model folder {str(path)!r}: model_index.json lists no {name!r} component")
        if not issubclass(component_class(entry[0], entry[1]), base):
            raise ModelNotFoundError(
                f"model folder {str(path)!r}: component {name!r} is a {entry[0]}.{entry[1]}; "
                f"expected a {base.__name__}"
            )
        if not (path / name).is_dir():
            raise ModelNotFoundError(f"model folder {str(path)!r} is incomplete: the {name!r} subfolder is missing")
    return index


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(parts[0]).exists()


def resolve_model_dir(path_or_id: str | os.PathLike, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local folder as it is; a Hub id `owner/name` downloaded (or found in the cache) with huggingface_hub.

    `patterns` chooses the files to download (default: a diffusers pipeline's configs and safetensors).
    """
    path = Path(path_or_id).expanduser()
    if path.exists() or not _is_hub_id(str(path_or_id)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(f"no model {str(path_or_id)!r} on the Hugging Face Hub (or it is gated)") from error
    except (LocalEntryNotFoundError, OSError) as error:
        raise ModelNotFoundError(
            f"cannot download {str(path_or_id)!r}: the Hugging Face Hub is unreachable and the model is not in the "
            "local cache. To work offline, download it once where there is a network "
            f"(`hf download {path_or_id}`) and set HF_HUB_OFFLINE=1, or pass the path of a local "
            "model folder; `LatentDiffusionPipeline.from_pretrained()` with no argument loads the bundled model."
        ) from error


def load_components(path: Path, torch_dtype: torch.dtype | None = None) -> dict:
    """Load the five components of a checked model folder."""
    index = check_model_dir(path)
    scheduler_cls = component_class(*index["scheduler"])
    tokenizer_cls = component_class(*index["tokenizer"])
    return {
        "tokenizer": tokenizer_cls.from_pretrained(path / "tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch_dtype),
        "vae": AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype),
        "unet": UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype),
        "scheduler": scheduler_cls.from_pretrained(path / "scheduler"),
    }


def read_defaults(path: Path) -> dict:
    """The generation defaults stored with a model (guidance scale, scheduler, steps), if any."""
    file = path / DEFAULTS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def save_components(components: dict, path: str | os.PathLike, defaults: dict | None = None) -> Path:
    """Write the diffusers folder layout, which diffusers' StableDiffusionPipeline also loads.

    The folder is written next to the target and moved into place at the end, so a failure
    half-way never leaves a broken model where a good one was; an old model is moved aside
    first and put back if the move fails. A target that exists and is not a model folder is
    refused rather than overwritten.
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and
                                                    not (target / "model_index.json").is_file())):
        raise ValueError(f"`save_directory`: {str(target)!r} exists and is not a model folder; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
                 "feature_extractor": [None, None], "safety_checker": [None, None],
                 "requires_safety_checker": False}
        for name in COMPONENTS:
            component = components[name]
            component.save_pretrained(staging / name)
            if name == "tokenizer" and hasattr(component, "backend_tokenizer"):
                # newer transformers write only tokenizer.json; vocab.json + merges.txt keep the
                # folder readable by older transformers' CLIPTokenizer and by other CLIP tools
                component.backend_tokenizer.model.save(str(staging / name))
            library = "transformers" if name in ("tokenizer", "text_encoder") else "diffusers"
            index[name] = [library, type(component).__name__]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if defaults:
            (staging / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
        old = staging.with_name(staging.name + "-old") if target.exists() else None
        if old is not None:
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the new model is in place; a leftover is only clutter
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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


def guess_config(checkpoint_path: Path) -> str:
    """"sd15" or "sd21", read off the width of the UNet's cross-attention in a single-file checkpoint."""
    from safetensors import safe_open

    with safe_open(checkpoint_path, framework="pt") as file:
        keys = [k for k in file.keys() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")]
        if not keys:
            raise ValueError(f"`path`: {str(checkpoint_path)!r} is not a Stable Diffusion 1.x/2.x checkpoint "
                             "(no UNet cross-attention weights); pass config= to say what it is")
        width = file.get_slice(keys[0]).get_shape()[1]
    known = {768: "sd15", 1024: "sd21"}
    if width not in known:
        raise ValueError(f"`path`: {str(checkpoint_path)!r} has cross-attention width {width}, neither SD 1.x (768) "
                         "nor SD 2.x (1024); pass config= naming a folder of component configs")
    return known[width]


def bundled_clip_tokenizer(config: str | os.PathLike = "sd15") -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer, read offline from the vocabulary shipped in `configs/clip_tokenizer`.

    Stable Diffusion 1.x and 2.x share this BPE vocabulary (49,408 tokens; start 49406, end
    49407); their special tokens differ and come from `<config>/tokenizer/tokenizer_config.json`:
    SD 1.x pads with "<|endoftext|>" (49407), SD 2.x with "!" (id 0), as diffusers' SD 2 tokenizer does.

    Args:
        config: "sd15", "sd21" or a model folder whose tokenizer/tokenizer_config.json gives the special tokens.
    """
    folder = Path(config) if Path(config).is_dir() else config_dir(str(config))
    vocabulary = config_root() / "clip_tokenizer"
    with tempfile.TemporaryDirectory() as staging:
        # CLIPTokenizer reads plain files; the shipped ones are gzip-compressed (0.5 MB instead of 1.5 MB)
        for name in ("vocab.json", "merges.txt"):
            (Path(staging) / name).write_bytes(gzip.decompress((vocabulary / f"{name}.gz").read_bytes()))
        shutil.copy(folder / "tokenizer" / "tokenizer_config.json", staging)
        return CLIPTokenizer.from_pretrained(staging)


def load_single_file(path: str | os.PathLike, config: str | None = None,
                     tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
                     torch_dtype: torch.dtype | None = None) -> dict:
    """Components from an original single-file Stable Diffusion checkpoint (.safetensors), offline.

    Conversion is diffusers' single-file loader; component configs come from `configs/<config>`
    and the CLIP vocabulary, which the checkpoint does not carry, from `configs/clip_tokenizer`,
    so no network is needed. `tokenizer=` may instead be a tokenizer, a local tokenizer folder
    or a Hub id (downloaded, or read from the Hub cache).
    """
    from diffusers import StableDiffusionPipeline

    checkpoint = Path(path)
    if not checkpoint.is_file() or checkpoint.suffix != ".safetensors":
        raise ValueError(f"`path`: {str(checkpoint)!r} is not a .safetensors file")
    name = config or guess_config(checkpoint)
    folder = config_dir(name) if not Path(name).is_dir() else Path(name)
    if tokenizer is None:
        tokenizer = _config_tokenizer(folder)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _named_tokenizer(tokenizer)
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(folder), local_files_only=True, torch_dtype=torch_dtype,
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
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
    if local.exists() or not _is_hub_id(str(name)):
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
