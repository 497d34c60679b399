"""Reading and writing model folders: the diffusers layout, local or from the Hub.

A model folder is what diffusers writes: `model_index.json` naming each component's class,
and one subfolder per component (`tokenizer/`, `text_encoder/`, `vae/`, `unet/`,
`scheduler/`) with its config and safetensors weights.

The file checks and errors here (`ModelFileError`, `read_json`, `check_safetensors`,
`load_part`) name the file at fault; `single_file` uses them for original checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from ..files import atomic_folder

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


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch pickles: loading one may run code it carries
CONFIG_FILES = {"tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}  # others: config.json


class ModelNotFoundError(ValueError):
    """A model folder or Hub id that cannot be read."""


class ModelFileError(ModelNotFoundError):
    """A model file that is there but cannot be used: corrupt, truncated, bad JSON, weights that do not fit the
    architecture, or pickled weights not allowed. `path` is the file (or component folder) at fault."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{self.path!r}: {message}")


def read_json(file: Path) -> dict:
    """A JSON object from a file, or a ModelFileError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(file, f"is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelFileError(file, f"holds a JSON {type(value).__name__}; expected an object")
    return value


def check_safetensors(file: Path) -> dict[str, tuple]:
    """Read a safetensors file's header (not its data): the shape of each tensor, or a ModelFileError naming the
    file when it is truncated, corrupt or empty."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as opened:
            return {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
    except Exception as error:  # safetensors raises its own error types, and OSError for unreadable files
        size = file.stat().st_size if file.exists() else 0
        raise ModelFileError(file, f"is not a readable safetensors file ({size} bytes; {error}); it is corrupt or "
                                   "truncated: download or save it again") from error


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Every safetensors file of a component folder has a whole header; pickled weights alone need `allow_pickle`."""
    safetensors = sorted(folder.glob("*.safetensors"))
    for file in safetensors:
        check_safetensors(file)
    pickled = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not safetensors and pickled and not allow_pickle:
        raise ModelFileError(pickled[0], "holds pickled weights, which can run code when loaded; convert them to "
                                         "safetensors, or pass allow_pickle=True if you trust the file (they are "
                                         "then loaded with torch.load(weights_only=True))")


def load_part(path: Path, what: str, load):
    """`load()`, with any failure of the libraries turned into one ModelFileError naming `path`."""
    try:
        loaded = load()
    except ModelNotFoundError:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ModelFileError(path, f"{what} does not load ({type(error).__name__}: {reason}); do the weights match "
                                   "the config's architecture?") from error
    if isinstance(loaded, torch.nn.Module):
        # weights missing from the file are left on the meta device by diffusers, with only a logged warning
        missing = [name for name, value in [*loaded.named_parameters(), *loaded.named_buffers()] if value.is_meta]
        if missing:
            raise ModelFileError(path, f"{what}: the weights lack {len(missing)} tensor(s) the config's architecture "
                                       f"has ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    return loaded


def _files_of(folder: Path) -> str:
    return ", ".join(sorted(f.name for f in folder.iterdir() if f.is_file())) if folder.is_dir() else "no files"


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
    index = read_json(index_file)
    for name, (library, base) in COMPONENTS.items():
        entry = index.get(name)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2
                                      and all(isinstance(e, (str, type(None))) for e in entry)):
            raise ModelFileError(index_file, f"entry {name!r} is {entry!r}; expected [library, class name]")
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


def is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(parts[0]).exists()


def resolve_model_dir(path_or_id: str | os.PathLike, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local folder as it is; a Hub id `owner/name` downloaded (or found in the cache) with huggingface_hub.

    `patterns` chooses the files to download (default: a diffusers pipeline's configs and safetensors).
    """
    path = Path(path_or_id).expanduser()
    if path.exists() or not is_hub_id(str(path_or_id)):
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


def load_components(path: Path, torch_dtype: torch.dtype | None = None, allow_pickle: bool = False) -> dict:
    """Load the five components of a checked model folder.

    Before the libraries read anything, every config must be valid JSON and every safetensors
    file whole; a component with only pickled weights (.bin, .ckpt, .pt) is refused unless
    `allow_pickle` (diffusers and transformers then load them with `torch.load(weights_only=True)`).
    Any failure is one `ModelFileError` naming the file or component folder at fault.
    """
    index = check_model_dir(path)
    for name in COMPONENTS:
        config = path / name / CONFIG_FILES.get(name, "config.json")
        if config.is_file():
            read_json(config)
        if name in ("text_encoder", "vae", "unet"):
            check_weights(path / name, allow_pickle)
    scheduler_cls = component_class(*index["scheduler"])
    tokenizer_cls = component_class(*index["tokenizer"])
    loaders = {
        "tokenizer": lambda: tokenizer_cls.from_pretrained(path / "tokenizer"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch_dtype),
        "vae": lambda: AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype),
        "unet": lambda: UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype),
        "scheduler": lambda: scheduler_cls.from_pretrained(path / "scheduler"),
    }
    return {name: load_part(path / name, f"the {name!r} component ({_files_of(path / name)})", load)
            for name, load in loaders.items()}


def read_defaults(path: Path) -> dict:
    """The generation defaults stored with a model (guidance scale, scheduler, steps), if any."""
    file = path / DEFAULTS_FILE
    return read_json(file) if file.is_file() else {}


def save_components(components: dict, path: str | os.PathLike, defaults: dict | None = None) -> Path:
    """Write the diffusers folder layout, which diffusers' StableDiffusionPipeline also loads.

    The folder is written next to the target and moved into place at the end (`files.atomic_folder`),
    so a failure half-way never leaves a broken model where a good one was. A target that exists and
    is not a model folder is refused rather than overwritten.
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and
                                                    not (target / "model_index.json").is_file())):
        raise ValueError(f"`save_directory`: {str(target)!r} exists and is not a model folder; choose another path")
    with atomic_folder(target) as staging:
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
    return target
