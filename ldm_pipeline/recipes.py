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
Just over 400 lines, kept whole: what a call records, how it is written into and read from a PNG,
and how it is drawn again are one idea, and they change together whenever a call gains a setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch

from . import images as image_ops, infotext, schedulers
from .files import atomic_path
from .model_hash import HASH_SHOWN, fingerprint, same_model

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

    from . import __version__

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


# -- writing and reading PNGs -------------------------------------------------------------------


def png_info(recipes: list[Recipe], grid: tuple[int, int] | None = None) -> PIL.PngImagePlugin.PngInfo:
    """The two text chunks: A1111's `parameters` (of the first image) and our JSON with every recipe."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", recipes[0].parameters())
    payload = {"format": FORMAT, "recipes": [r.to_dict() for r in recipes]}
    if grid is not None:
        payload["grid"] = {"rows": grid[0], "cols": grid[1]}
    info.add_text(CHUNK, json.dumps(payload))
    return info


def write_png(image: PIL.Image.Image, path: str | os.PathLike, recipes: list[Recipe],
              grid: tuple[int, int] | None = None) -> Path:
    """Write `image` to `path` as a PNG carrying `recipes`, atomically (a temporary file, then a rename).

    Args:
        recipes: one recipe, or one per cell of a grid (row by row) with `grid=(rows, cols)`.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"`path`: got {str(path)!r}; recipes are written into PNG files, expected a .png name")
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=png_info(recipes, grid))
    return path


def _pil_images(output) -> list[PIL.Image.Image]:
    found = output.images
    if isinstance(found, list):
        return found
    if isinstance(found, torch.Tensor) and found.ndim == 4 and found.shape[1] == 3:
        found = found.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(found, np.ndarray) and found.ndim == 4 and found.shape[3] == 3:
        return [PIL.Image.fromarray(frame) for frame in (found * 255).round().astype(np.uint8)]
    raise ValueError("`output_type`: latents cannot be saved as images; draw with output_type='pil', 'np' or 'pt'")


def save_output(output, path: str | os.PathLike) -> list[Path]:
    """Write each image of a `PipelineOutput` as a PNG carrying its recipe.

    Args:
        path: a `.png` file for a single image, or a folder (made if needed) for any number:
            there image i is `{i:03d}-seed{seed}.png` (`{i:03d}.png` without seeds).

    Returns:
        The paths written, in image order.
    """
    path = Path(path)
    pictures = _pil_images(output)
    recipes = recipes_of(output)
    if path.suffix:
        if path.suffix.lower() != ".png":
            raise ValueError(f"`path`: got {str(path)!r}; expected a .png file name or a folder")
        if len(pictures) != 1:
            raise ValueError(f"`path`: {str(path)!r} is one file but the output holds {len(pictures)} images; "
                             "give a folder")
        return [write_png(pictures[0], path, recipes)]
    if path.is_file():
        raise ValueError(f"`path`: {str(path)!r} is a file; expected a .png file name or a folder")
    names = [f"{i:03d}-seed{r.seed}.png" if r.seed is not None else f"{i:03d}.png" for i, r in enumerate(recipes)]
    return [write_png(picture, path / name, [recipe]) for picture, name, recipe in zip(pictures, names, recipes)]


def read_recipes(path: str | os.PathLike) -> tuple[list[Recipe], tuple[int, int] | None]:
    """Every recipe in a PNG, and its grid shape (rows, cols) or None.

    Reads our JSON chunk; without it, the A1111 `parameters` chunk (one recipe, without the
    scheduler config, dtype and reference hash).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path`: no file at {str(path)!r}")
    try:
        with PIL.Image.open(path) as opened:
            chunks = dict(getattr(opened, "text", None) or opened.info)
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"`path`: {str(path)!r} is not a readable image ({error})") from error
    if CHUNK in chunks:
        try:
            payload = json.loads(chunks[CHUNK])
            version = payload["format"]
            recipes = [Recipe.from_dict(r) for r in payload["recipes"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"`path`: the {CHUNK!r} chunk of {str(path)!r} is damaged ({error})") from error
        if version > FORMAT:
            raise ValueError(f"`path`: {str(path)!r} holds a recipe of format {version}, written by a newer "
                             f"ldm-pipeline; this one reads format {FORMAT}")
        grid = payload.get("grid")
        return recipes, (grid["rows"], grid["cols"]) if grid else None
    if isinstance(chunks.get("parameters"), str):
        return [Recipe(**infotext.parse_parameters(chunks["parameters"], str(path)))], None
    raise ValueError(f"`path`: {str(path)!r} carries no recipe (neither an {CHUNK!r} nor a 'parameters' text "
                     "chunk); only PNGs written by ldm-pipeline or A1111-style tools have one")


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe of a PNG written by `PipelineOutput.save`, `ldm generate` or an A1111-style tool.

    A grid holds several: this raises for one, naming them; use `read_recipes`.
    """
    recipes, _ = read_recipes(path)
    if len(recipes) != 1:
        raise ValueError(f"`path`: {str(path)!r} is a grid of {len(recipes)} images with a recipe each; "
                         "use ldm_pipeline.read_recipes(path) for the list")
    return recipes[0]


# -- drawing again ------------------------------------------------------------------------------

# fields that must agree for recipes to be drawn in one call (prompt, negative prompt and seed may differ)
_CALL_FIELDS = ("num_inference_steps", "guidance_scale", "height", "width", "scheduler", "scheduler_config", "eta",
                "prompt_weighting", "prompt_composition", "strength", "image_hash", "image_path", "model_hash",
                "steps_run", "clip_guidance_scale", "clip_guidance_every", "clip_model", "loras")


def _scheduler_for(recipe: Recipe, pipe):
    config = recipe.scheduler_config
    if config is None:  # from A1111 text: the name on top of the model's own config
        return schedulers.make_scheduler(recipe.scheduler, pipe.scheduler.config)
    if recipe.scheduler in schedulers.SCHEDULERS:
        cls = schedulers.SCHEDULERS[recipe.scheduler][0]
    else:
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", recipe.scheduler), None)
        if cls is None:
            raise ValueError(f"`recipe`: scheduler {recipe.scheduler!r} is not a diffusers scheduler this "
                             "installation has")
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def _reference(recipe: Recipe, image) -> PIL.Image.Image | None:
    if recipe.strength is None:
        if image is not None:
            raise ValueError("`image`: the recipe is text-to-image; it takes no image")
        return None
    if image is None and recipe.image_path and Path(recipe.image_path).is_file():
        image = recipe.image_path
    if image is None:
        hint = f" (it was {recipe.image_path!r})" if recipe.image_path else ""
        raise ValueError(f"`image`: the recipe is image-to-image and its reference picture is not in it{hint}; "
                         "pass it with image=")
    reference = image_ops.load_image(image)
    if recipe.image_hash and image_hash(reference) != recipe.image_hash:
        raise ValueError(f"`image`: this reference picture is not the one the image was drawn from (its pixels' "
                         f"SHA-256 is {image_hash(reference)[:12]}..., the recipe's {recipe.image_hash[:12]}...)")
    return reference


def reproduce(pipe, source, image=None, ignore_model_hash: bool = False, progress: bool = True):
    """Draw the image(s) of a recipe again with `pipe`; see `LatentDiffusionPipeline.reproduce`."""
    import copy

    if isinstance(source, Recipe):
        recipes = [source]
    elif isinstance(source, (list, tuple)) and source and all(isinstance(r, Recipe) for r in source):
        recipes = list(source)
    elif isinstance(source, (str, os.PathLike)):
        recipes, _ = read_recipes(source)
    else:
        raise TypeError(f"`source`: got {type(source).__name__}; expected a PNG path, a Recipe or a list of them")
    first = recipes[0]
    for recipe in recipes:
        if recipe.not_reproducible:
            raise ValueError(f"`source`: this image cannot be drawn again: {recipe.not_reproducible}")
        if recipe.seed is None:
            raise ValueError("`source`: the recipe has no seed, so its starting noise is unknown")
        if any(getattr(recipe, name) != getattr(first, name) for name in _CALL_FIELDS):
            raise ValueError("`source`: these recipes come from different calls; reproduce them one at a time")
    _check_loras(first, pipe)
    if not ignore_model_hash:
        present = pipe.model_hash()
        if not first.model_hash:
            raise ValueError("`source`: the recipe names no model hash, so the model cannot be checked; pass "
                             "ignore_model_hash=True (--ignore-model-hash) to draw with this one anyway")
        if not same_model(first.model_hash, present):
            raise ValueError(f"`source`: the image was drawn by model {first.model!r} with hash "
                             f"{first.model_hash[:HASH_SHOWN]}, but this pipeline's model has hash "
                             f"{present[:HASH_SHOWN]}; load that model, or pass ignore_model_hash=True "
                             "(--ignore-model-hash) to draw with this one anyway")
    if first.dtype and first.device and (first.dtype, first.device) != (str(pipe.dtype).removeprefix("torch."),
                                                                         pipe.device.type):
        warnings.warn(f"the image was drawn in {first.dtype} on {first.device}; this pipeline runs "
                      f"{str(pipe.dtype).removeprefix('torch.')} on {pipe.device.type}, so pixels may differ "
                      "slightly", stacklevel=3)
    reference = _reference(first, image)
    twin = copy.copy(pipe)  # shares the models; only its scheduler is the recipe's
    twin.scheduler = _scheduler_for(first, pipe)
    callback = None
    if first.steps_run is not None:  # the original loop was stopped after this many steps (or ran them all)
        callback = lambda step, timestep, latents: step + 1 < first.steps_run  # noqa: E731
    negatives = [r.negative_prompt for r in recipes]
    clip = _clip_for(first, pipe) if first.clip_guidance_scale else None
    return twin([r.prompt for r in recipes], negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                height=first.height, width=first.width, seed=[r.seed for r in recipes], image=reference,
                strength=first.strength if first.strength is not None else 0.8, eta=first.eta, callback=callback,
                progress=progress, prompt_weighting=first.prompt_weighting,
                prompt_composition=first.prompt_composition,
                regions=[r.regions for r in recipes] if any(r.regions for r in recipes) else None,
                clip_guidance_scale=first.clip_guidance_scale, clip_guidance_every=first.clip_guidance_every,
                clip_model=clip)


def _clip_for(recipe: Recipe, pipe):
    """The CLIP a CLIP-guided image was steered with, loaded from the name it recorded, weights checked."""
    from .guidance import clip_for

    name, _, digest = (recipe.clip_model or "").rpartition("@")
    clip = clip_for(None if name == "shapes_clip" else name, pipe.device)
    if not clip.name.endswith(f"@{digest}"):
        raise ValueError(f"`source`: the image was steered by CLIP {recipe.clip_model!r}, but the CLIP found there "
                         f"has weights {clip.name.rpartition('@')[2]}; draw it with that CLIP's recipe fields by hand")
    return clip


def _check_loras(recipe: Recipe, pipe) -> None:
    """Refuse to draw again unless the same LoRA files act at the same scales."""
    from .adapters import recipe_of

    def signature(loras):
        return sorted((l.get("sha256") or l["name"], float(l["scale"])) for l in loras or [])

    wanted, present = recipe.loras or [], recipe_of(pipe).get("loras", [])
    if signature(wanted) != signature(present):
        def describe(loras):
            return ", ".join(f"{l['name']} ({(l.get('sha256') or '?')[:12]}, scale {l['scale']:g})" for l in loras) \
                or "none"
        raise ValueError(f"`source`: the image was drawn with LoRA adapters {describe(wanted)}; this pipeline has "
                         f"{describe(present)}; load_lora_weights / set_adapters to match")
