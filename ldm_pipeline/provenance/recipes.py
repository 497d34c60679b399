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
The model hash is `model_hash.ModelIdentity`'s; the A1111 text is `infotext`'s.
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
from .hashes import fingerprint

FORMAT = 1  # of the JSON chunk; bumped when a field changes meaning
CHUNK = "ldm_pipeline"  # the JSON chunk's key; A1111's is "parameters"


@dataclass
class Recipe:
    """How one image was drawn. Field names are `pipe(...)`'s argument names where there is one."""

    prompt: str
    negative_prompt: str = ""  # "" when none was given (the same pixels as the empty prompt)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int | None = None  # None when the call took generator= (then it cannot be drawn again)
    height: int = 512
    width: int = 512
    scheduler: str = "ddim"  # a `schedulers.SCHEDULERS` name, else the diffusers class name
    scheduler_config: dict | None = None  # the scheduler's whole config (None when read from A1111 text)
    eta: float = 0.0
    prompt_weighting: bool = False  # whether `(word:1.3)` was read as a weight (see prompts.py)
    prompt_composition: bool = False  # whether `A AND B` was read as composed prompts (see composition.py)
    regions: list | None = None  # composed prompts: each part's (left, top, right, bottom) box, or None
    strength: float | None = None  # image-to-image only
    clip_guidance_scale: float = 0.0  # CLIP guidance (guidance.py); 0 = off
    clip_guidance_every: int = 1
    clip_model: str | None = None  # the steering CLIP's name@weights-digest ("shapes_clip@..." = the bundled one)
    loras: list[dict] | None = None  # acting LoRA adapters: name, scale, sha256 of the file, fused
    image_hash: str | None = None  # image-to-image: SHA-256 of the reference's RGB pixels (`image_hash`)
    image_path: str | None = None  # image-to-image: the reference's file, when it was given as a path
    model: str | None = None  # the model's name (its folder, Hub id or file name)
    model_hash: str | None = None  # see `model_hash.ModelIdentity`
    steps_run: int | None = None  # fewer than the schedule's when a callback stopped the loop
    dtype: str | None = None  # "float32", "float16", ...: pixels differ a little between dtypes
    device: str | None = None  # "cpu", "cuda": and between devices
    versions: dict = field(default_factory=dict)  # torch, diffusers, ldm_pipeline
    not_reproducible: str | None = None  # why not, when the call took latents=, prompt_embeds= or generator=

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def parameters(self) -> str:
        """This recipe as A1111's `parameters` text (see `infotext`)."""
        return infotext.format_parameters(self, self.versions.get("ldm_pipeline", ""))


def image_hash(image: PIL.Image.Image) -> str:
    """SHA-256 of an RGB image's size and pixels (the reference of an image-to-image call)."""
    rgb = image_ops.load_image(image)
    return hashlib.sha256(f"{rgb.width}x{rgb.height};".encode() + rgb.tobytes()).hexdigest()


# -- what a call records ----------------------------------------------------------------------


@dataclass
class CallRecord:
    """What a pipeline call keeps for the recipes of its images (attached to `PipelineOutput.call`)."""

    pipe: object
    weights: tuple  # `fingerprint` at the call
    prompts: list[str] | None
    negatives: list[str] | None
    images_per_prompt: int
    scheduler: str
    scheduler_class: str
    scheduler_config: dict
    eta: float
    image_hash: str | None
    image_path: str | None
    not_reproducible: str | None
    prompt_weighting: bool = False
    settings: dict = field(default_factory=dict)  # more `Recipe` fields, as the guidances report them

    @classmethod
    def of(cls, pipe, prompts, negatives, images_per_prompt: int, scheduler, eta: float, reference, image,
           generator_given: bool, latents_given: bool, embeds_given: bool,
           prompt_weighting: bool = False, settings: dict | None = None) -> "CallRecord":
        reasons = [why for given, why in ((generator_given, "generator= was passed (give seed= instead)"),
                                          (latents_given, "latents= was passed"),
                                          (embeds_given, "prompt embeddings were passed")) if given]
        return cls(pipe=pipe, weights=fingerprint(pipe), prompts=prompts, negatives=negatives,
                   images_per_prompt=images_per_prompt, scheduler=schedulers.scheduler_name(scheduler),
                   scheduler_class=type(scheduler).__name__,
                   # diffusers' private entries say nothing of the schedule, and one is a list in set order
                   scheduler_config=_plain({k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}),
                   eta=float(eta), image_hash=image_hash(reference) if reference is not None else None,
                   image_path=str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else None,
                   not_reproducible="; ".join(reasons) or None, prompt_weighting=prompt_weighting,
                   settings=dict(settings or {}))


def _plain(value):
    """A config as JSON-ready values (diffusers configs hold tuples, numpy numbers and arrays)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "ldm_pipeline": __version__}


def recipes_of(output) -> list[Recipe]:
    """One recipe per image of a `PipelineOutput`, in order."""
    call = output.call
    if call is None:
        raise ValueError("this output carries no call record, so its recipes are unknown")
    pipe = call.pipe
    model_hash = pipe.identity.hash(pipe, call.weights)
    count = len(output.images)
    shared = dict(num_inference_steps=output.num_inference_steps, guidance_scale=float(output.guidance_scale),
                  height=output.height, width=output.width, scheduler=call.scheduler,
                  scheduler_config={**call.scheduler_config, "_class_name": call.scheduler_class}, eta=call.eta,
                  strength=output.strength, image_hash=call.image_hash, image_path=call.image_path,
                  model=pipe.identity.name, model_hash=model_hash, steps_run=output.steps_run,
                  dtype=str(pipe.dtype).removeprefix("torch."), device=pipe.device.type, versions=_versions(),
                  not_reproducible=call.not_reproducible, prompt_weighting=call.prompt_weighting, **call.settings)
    shared_regions = shared.pop("regions", None)  # per prompt, not per call
    recipes = []
    for i in range(count):
        row = i // call.images_per_prompt
        prompt = call.prompts[row] if call.prompts else ""
        negative = call.negatives[row] if call.negatives else ""
        seed = output.seeds[i] if output.seeds else None
        regions = shared_regions[row] if shared_regions else None
        recipes.append(Recipe(prompt=prompt, negative_prompt=negative, seed=seed, regions=regions, **shared))
    return recipes
