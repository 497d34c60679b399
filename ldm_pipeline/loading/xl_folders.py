"""SDXL model folders: diffusers' `StableDiffusionXLPipeline` / `StableDiffusionXLImg2ImgPipeline` layout.

A base folder has two tokenizers and text encoders (`tokenizer`, `text_encoder`: CLIP ViT-L;
`tokenizer_2`, `text_encoder_2`: OpenCLIP ViT-bigG with its projection), `vae`, `unet` and `scheduler`;
a refiner folder lists `tokenizer` and `text_encoder` as `[null, null]`. `model_index.json` also
holds two settings: `force_zeros_for_empty_prompt` (base: true) and `requires_aesthetics_score`
(refiner: true). The file checks and errors are `folders`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from ..files import atomic_folder
from .folders import (CONFIG_FILES, DEFAULTS_FILE, ModelFileError, ModelNotFoundError, _files_of, check_weights,
                      component_class, load_part, read_json)

# component -> (library, what it must be an instance of, whether a refiner may leave it out)
XL_COMPONENTS = {
    "tokenizer": ("transformers", PreTrainedTokenizerBase, True),
    "text_encoder": ("transformers", CLIPTextModel, True),
    "tokenizer_2": ("transformers", PreTrainedTokenizerBase, False),
    "text_encoder_2": ("transformers", CLIPTextModelWithProjection, False),
    "vae": ("diffusers", AutoencoderKL, False),
    "unet": ("diffusers", UNet2DConditionModel, False),
    "scheduler": ("diffusers", SchedulerMixin, False),
}
SETTINGS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}  # diffusers' defaults


def is_xl_folder(path: Path) -> bool:
    """Whether a local folder's model_index.json names a second text encoder (an SDXL base or refiner)."""
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        return False
    entry = read_json(index_file).get("text_encoder_2")
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def check_components(components: dict) -> None:
    """Raise a TypeError naming any component that is missing or of the wrong kind (a refiner may have no
    `tokenizer` and `text_encoder`, but not one without the other)."""
    for name, (_, base, optional) in XL_COMPONENTS.items():
        value = components.get(name)
        if value is None and optional:
            continue
        if not isinstance(value, base):
            raise TypeError(f"`{name}`: got {type(value).__name__}; expected a {base.__module__}.{base.__name__}")
    if (components.get("tokenizer") is None) != (components.get("text_encoder") is None):
        raise TypeError("`tokenizer`, `text_encoder`: give both (SDXL base) or neither (a refiner)")


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def check_xl_dir(path: Path) -> dict:
    """Check that `path` holds a complete SDXL folder; return its model_index.json as a dict."""
    if not path.is_dir():
        raise ModelNotFoundError(f"model folder {str(path)!r} does not exist")
    index_file = path / "model_index.json"
    index = read_json(index_file)
    for name, (library, base, optional) in XL_COMPONENTS.items():
        entry = index.get(name)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2
                                      and all(isinstance(e, (str, type(None))) for e in entry)):
            raise ModelFileError(index_file, f"entry {name!r} is {entry!r}; expected [library, class name]")
        if not _present(index, name):
            if optional:
                continue
            raise ModelNotFoundError(f"model folder {str(path)!r}: model_index.json lists no {name!r} component")
        if not issubclass(component_class(entry[0], entry[1]), base):
            raise ModelNotFoundError(f"model folder {str(path)!r}: component {name!r} is a {entry[0]}.{entry[1]}; "
                                     f"expected a {base.__name__}")
        if not (path / name).is_dir():
            raise ModelNotFoundError(f"model folder {str(path)!r} is incomplete: the {name!r} subfolder is missing")
    if _present(index, "tokenizer") != _present(index, "text_encoder"):
        raise ModelNotFoundError(f"model folder {str(path)!r}: lists one of 'tokenizer' and 'text_encoder' without "
                                 "the other")
    return index


def load_xl_components(path: Path, torch_dtype: torch.dtype | None = None,
                       allow_pickle: bool = False) -> tuple[dict, dict]:
    """Load a checked SDXL folder's components (None for those a refiner leaves out), and its settings
    (`force_zeros_for_empty_prompt`, `requires_aesthetics_score`)."""
    index = check_xl_dir(path)
    present = [name for name in XL_COMPONENTS if _present(index, name)]
    for name in present:
        config = path / name / CONFIG_FILES.get(name.removesuffix("_2"), "config.json")
        if config.is_file():
            read_json(config)
        if name in ("text_encoder", "text_encoder_2", "vae", "unet"):
            check_weights(path / name, allow_pickle)
    classes = {name: component_class(*index[name]) for name in present}
    loaders = {
        "tokenizer": lambda: classes["tokenizer"].from_pretrained(path / "tokenizer"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch_dtype),
        "tokenizer_2": lambda: classes["tokenizer_2"].from_pretrained(path / "tokenizer_2"),
        "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2",
                                                                              dtype=torch_dtype),
        "vae": lambda: AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype),
        "unet": lambda: UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype),
        "scheduler": lambda: classes["scheduler"].from_pretrained(path / "scheduler"),
    }
    components = {name: (load_part(path / name, f"the {name!r} component ({_files_of(path / name)})", load)
                         if name in present else None) for name, load in loaders.items()}
    settings = {key: bool(index.get(key, value)) for key, value in SETTINGS.items()}
    return components, settings


def save_xl_components(components: dict, path: str | os.PathLike, settings: dict,
                       defaults: dict | None = None) -> Path:
    """Write diffusers' SDXL folder layout, which diffusers' `StableDiffusionXLPipeline` (a refiner:
    `StableDiffusionXLImg2ImgPipeline`) also loads; written aside and moved into place as `folders` does."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and
                                                    not (target / "model_index.json").is_file())):
        raise ValueError(f"`save_directory`: {str(target)!r} exists and is not a model folder; choose another path")
    # diffusers' text-to-image class takes no aesthetic score: a refiner's folder names the image-to-image one
    image_to_image = components.get("text_encoder") is None or settings.get("requires_aesthetics_score")
    if not image_to_image:
        settings = {k: v for k, v in settings.items() if k != "requires_aesthetics_score"}
    with atomic_folder(target) as staging:
        index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if image_to_image else "StableDiffusionXLPipeline",
                 "_diffusers_version": diffusers.__version__, "feature_extractor": [None, None],
                 "image_encoder": [None, None], **settings}
        for name in XL_COMPONENTS:
            component = components.get(name)
            if component is None:
                index[name] = [None, None]
                continue
            component.save_pretrained(staging / name)
            if name.startswith("tokenizer") and hasattr(component, "backend_tokenizer"):
                component.backend_tokenizer.model.save(str(staging / name))  # vocab.json + merges.txt, as folders
            library = "transformers" if name.startswith(("tokenizer", "text_encoder")) else "diffusers"
            index[name] = [library, type(component).__name__]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if defaults:
            (staging / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    return target
