"""The recipe of an image: everything needed to draw the same pixels again, kept inside its PNG.

Each PNG the project writes carries its recipe twice, as PNG text chunks:
- `parameters`: AUTOMATIC1111's text (the prompt; `Negative prompt: ...`; a last line
  `Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model hash: ..., Model: ...`),
  which A1111's "PNG Info", sd-parsers and image sites read;
- `ldm_pipeline`: JSON `{"format": 1, "recipes": [...], "grid": {"rows": R, "cols": C}}` with
  every field exactly (one recipe per image; a grid carries one per cell, row by row).

`read_recipe` reads ours, else A1111's text. `reproduce` draws again, refusing when the model's
hash differs. A pipeline image depends only on its own seed, prompt and settings (not on the
rest of its batch), so one image of a batch is drawn again alone.
The model hash is `hashes.ModelIdentity`'s; the A1111 text is `infotext`'s.
Written into and read from PNGs by `png`; drawn again by `reproduce`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from .. import images as image_ops
from . import infotext
from ..sampling import schedulers
from ..settings import CALL, PROMPT, fields_of, meta, recipe_fields
from .hashes import fingerprint

FORMAT = 1  # of the JSON chunk; bumped when a field changes meaning
CHUNK = "ldm_pipeline"  # the JSON chunk's key; A1111's is "parameters"


class _RecipeMethods:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        # JSON has no tuples: SDXL's sizes (recipe type tuple) come back as lists
        return cls(**{k: tuple(v) if isinstance(v, list) and known[k] in (tuple, tuple | None) else v
                      for k, v in data.items() if k in known})

    def parameters(self) -> str:
        """This recipe as A1111's `parameters` text (see `infotext`)."""
        return infotext.format_parameters(self, self.versions.get("ldm_pipeline", ""))


# What a recipe adds to the settings it keeps (`settings.recipe_fields`): how the image was drawn besides them.
PROVENANCE = [
    ("scheduler", str, field(default="ddim")),  # a `schedulers.SCHEDULERS` name, else the diffusers class name
    ("scheduler_config", dict | None, field(default=None)),  # the scheduler's whole config (None from A1111 text)
    ("loras", list | None, field(default=None)),  # acting LoRA adapters: name, scale, sha256 of the file, fused
    ("image_hash", str | None, field(default=None)),  # image-to-image: SHA-256 of the reference's RGB pixels
    ("image_path", str | None, field(default=None)),  # image-to-image: the reference's file, when given as a path
    ("mask_hash", str | None, field(default=None)),  # inpainting: SHA-256 of the mask, binarised (`mask_hash`)
    ("mask_path", str | None, field(default=None)),  # inpainting: the mask's file, when given as a path
    ("controlnets", list | None, field(default=None)),  # per net: name, weights digest, picture digest, scale, ...
    ("embeddings", list | None, field(default=None)),
    ("fast", bool, field(default=False)),  # drawn in fast mode (`enable_fast`: the model's LCM-LoRA fused)  # textual-inversion tokens loaded: token, vectors, sha256
    ("model", str | None, field(default=None)),  # the model's name (its folder, Hub id or file name)
    ("model_hash", str | None, field(default=None)),  # see `hashes.ModelIdentity`
    ("steps_run", int | None, field(default=None)),  # fewer than the schedule's when a callback stopped the loop
    ("dtype", str | None, field(default=None)),  # "float32", "float16", ...: pixels differ a little between dtypes
    ("device", str | None, field(default=None)),  # "cpu", "cuda": and between devices
    ("versions", dict, field(default_factory=dict)),  # torch, diffusers, ldm_pipeline
    ("not_reproducible", str | None, field(default=None)),  # why not: the call took latents=, embeddings or generator=
]

Recipe = dataclasses.make_dataclass("Recipe", [*recipe_fields(), *PROVENANCE], bases=(_RecipeMethods,))
Recipe.__module__ = __name__  # for pickling and the docs
Recipe.__doc__ = """How one image was drawn: the settings a recipe keeps (`GenerationSettings` fields, one
image's value: its prompt, negative prompt ("" for none) and seed (None when the call took generator=)),
then `PROVENANCE`: the scheduler, adapters, reference picture, model and software it was drawn with."""


def image_hash(image: PIL.Image.Image) -> str:
    """SHA-256 of an RGB image's size and pixels (the reference of an image-to-image call)."""
    rgb = image_ops.load_image(image)
    return hashlib.sha256(f"{rgb.width}x{rgb.height};".encode() + rgb.tobytes()).hexdigest()


def mask_hash(mask: PIL.Image.Image) -> str:
    """SHA-256 of a binary "L" mask's size and pixels (`masks.load_mask`'s result): what the model saw."""
    return hashlib.sha256(f"mask {mask.width}x{mask.height};".encode() + mask.tobytes()).hexdigest()


def _path(value) -> str | None:
    return str(Path(value).resolve()) if isinstance(value, (str, os.PathLike)) else None


# -- what a call records ----------------------------------------------------------------------


@dataclass
class CallRecord:
    """What a pipeline call keeps for the recipes of its images (attached to `PipelineOutput.call`)."""

    pipe: object
    weights: tuple  # `fingerprint` at the call
    settings: object  # the call's `GenerationSettings`, defaults filled in
    prompts: list[str] | None
    negatives: list[str] | None
    scheduler: str
    scheduler_class: str
    scheduler_config: dict
    image_hash: str | None
    image_path: str | None
    mask_hash: str | None
    mask_path: str | None
    not_reproducible: str | None
    extra: dict = field(default_factory=dict)  # recipe fields the guidances and adapters report (clip_model, loras)

    @classmethod
    def of(cls, pipe, call, scheduler, extra: dict | None = None) -> "CallRecord":
        """The record of `call` (a `stages.Call`) run with `scheduler`."""
        s = call.settings
        reasons = [why for given, why in ((call.seeds is None, "generator= was passed (give seed= instead)"),
                                          (s.latents is not None, "latents= was passed"),
                                          (s.prompt_embeds is not None, "prompt embeddings were passed"),
                                          (call.image_latents is not None, "image= was latents (draw the "
                                                                           "latents' own image first)")) if given]
        return cls(pipe=pipe, weights=fingerprint(pipe), settings=s, prompts=call.prompts, negatives=call.negatives,
                   scheduler=schedulers.scheduler_name(scheduler), scheduler_class=type(scheduler).__name__,
                   # diffusers' private entries say nothing of the schedule, and one is a list in set order
                   scheduler_config=_plain({k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}),
                   image_hash=image_hash(call.reference) if call.reference is not None else None,
                   image_path=_path(s.image), mask_path=_path(s.mask_image),
                   mask_hash=mask_hash(call.region.mask) if call.region is not None else None,
                   not_reproducible="; ".join(reasons) or None, extra=dict(extra or {}))


def _plain(value):
    """A config as JSON-ready values (diffusers configs hold tuples, numpy numbers and arrays)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "ldm_pipeline": __version__}


def _kept(value):
    """A setting's value as a recipe keeps it: plain values as they are, objects (a CLIP model) not at all."""
    return value if value is None or isinstance(value, (bool, int, float, str, list, tuple, dict)) else None


def _given(value) -> bool:
    return value is not None and value is not False


def recipes_of(output) -> list[Recipe]:
    """One recipe per image of a `PipelineOutput`, in order."""
    call = output.call
    if call is None:
        raise ValueError("this output carries no call record, so its recipes are unknown")
    pipe, s = call.pipe, call.settings
    shared = {f.name: _kept(getattr(s, f.name)) for f in fields_of(CALL)}
    shared.update({f.name: None for f in fields_of(CALL) if meta(f.name).only_with
                   and not _given(getattr(s, meta(f.name).only_with))})  # strength without an image, ...
    shared.update(guidance_scale=float(s.guidance_scale), eta=float(s.eta))
    if not s.clip_guidance_scale > 0:
        shared.update(clip_guidance_scale=0.0, clip_guidance_every=1, clip_model=None)
    shared.update(scheduler=call.scheduler,
                  scheduler_config={**call.scheduler_config, "_class_name": call.scheduler_class},
                  image_hash=call.image_hash, image_path=call.image_path, mask_hash=call.mask_hash,
                  mask_path=call.mask_path, model=pipe.identity.name,
                  model_hash=pipe.identity.hash(pipe, call.weights), steps_run=output.steps_run,
                  dtype=str(pipe.dtype).removeprefix("torch."), device=pipe.device.type, versions=_versions(),
                  not_reproducible=call.not_reproducible, **call.extra)
    images_per_prompt = s.num_images_per_prompt
    recipes = []
    for i in range(len(output.images)):
        row = i // images_per_prompt
        per_image = dict(prompt=call.prompts[row] if call.prompts else "",
                         negative_prompt=call.negatives[row] if call.negatives else "",
                         seed=output.seeds[i] if output.seeds else None)
        per_prompt = {f.name: (getattr(s, f.name) or [None] * (row + 1))[row] for f in fields_of(PROMPT)}
        recipes.append(Recipe(**per_image, **per_prompt, **shared))
    return recipes
