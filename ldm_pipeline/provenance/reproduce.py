"""Drawing an image again from its recipe, refusing when the model, the reference or the adapters differ."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import PIL.Image

from .. import images as image_ops
from ..sampling import schedulers
from .hashes import HASH_SHOWN, same_model
from .png import read_recipes
from .. import masks
from ..settings import CALL, IMAGE, PROMPT, default, fields_of, meta
from .recipes import Recipe, image_hash, mask_hash

# fields that must agree for recipes to be drawn in one call (the per-image ones may differ)
_CALL_FIELDS = (*(f.name for f in fields_of(CALL)), "scheduler", "scheduler_config", "image_hash", "image_path",
                "mask_hash", "mask_path", "model_hash", "steps_run", "loras", "controlnets", "embeddings")


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


def _recorded(argument: str, given, path: str | None, used: bool, kind: str, thing: str):
    """The picture (or mask) to draw again with: the one given, else the file the recipe names.

    Args:
        used: whether the recipe's call took one; `kind` and `thing` name the call and the picture in errors.
    """
    if not used:
        if given is not None:
            raise ValueError(f"`{argument}`: the recipe is not {kind}; it takes no {thing}")
        return None
    if given is None and path and Path(path).is_file():
        given = path
    if given is None:
        hint = f" (it was {path!r})" if path else ""
        raise ValueError(f"`{argument}`: the recipe is {kind} and its {thing} is not in it{hint}; pass it with "
                         f"{argument}=")
    return given


def _reference(recipe: Recipe, image) -> PIL.Image.Image | None:
    image = _recorded("image", image, recipe.image_path, recipe.strength is not None, "image-to-image",
                      "reference picture")
    if image is None:
        return None
    reference = image_ops.load_image(image)
    if recipe.image_hash and image_hash(reference) != recipe.image_hash:
        raise ValueError(f"`image`: this reference picture is not the one the image was drawn from (its pixels' "
                         f"SHA-256 is {image_hash(reference)[:12]}..., the recipe's {recipe.image_hash[:12]}...)")
    return reference


def _mask(recipe: Recipe, mask, reference) -> PIL.Image.Image | None:
    mask = _recorded("mask_image", mask, recipe.mask_path, recipe.mask_hash is not None, "an inpainting one", "mask")
    if mask is None:
        return None
    binary = masks.load_mask(mask, reference.size)
    if mask_hash(binary) != recipe.mask_hash:
        raise ValueError(f"`mask_image`: this mask is not the one the image was drawn with (its SHA-256 is "
                         f"{mask_hash(binary)[:12]}..., the recipe's {recipe.mask_hash[:12]}...)")
    return binary


def _controls(recipe: Recipe, pipe, nets, pictures) -> dict:
    """The ControlNet arguments to draw again with: the nets given (else the pipeline's own), checked against the
    recorded weights, and their pictures (given, else the recorded files), checked against the recorded pixels."""
    units = recipe.controlnets
    if not units:
        if nets is not None or pictures is not None:
            raise ValueError("`controlnet`: the recipe used no ControlNet; it takes none")
        return {}
    from ..conditioning.controlnet import digest

    nets = nets if nets is not None else pipe.controlnet
    nets = list(nets) if isinstance(nets, (list, tuple)) else [nets] if nets is not None else []
    if [digest(net) for net in nets] != [unit["digest"] for unit in units]:
        raise ValueError(f"`controlnet`: the image was drawn with ControlNet weights "
                         f"{', '.join(u['name'] + ' ' + u['digest'][:8] for u in units)}; pass those nets with "
                         "controlnet= (or build the pipeline with them)")
    given = pictures if isinstance(pictures, (list, tuple)) else [pictures] * len(units)
    found = []
    for unit, picture in zip(units, given):
        picture = _recorded("control_image", picture, unit.get("image_path"), True, "a ControlNet one",
                            "control picture")
        loaded = image_ops.load_image(picture)
        if image_hash(loaded) != unit["image_hash"]:
            raise ValueError("`control_image`: this control picture is not the one the image was drawn with")
        found.append(loaded)
    return dict(controlnet=nets, control_image=found, controlnet_conditioning_scale=[u["scale"] for u in units],
                control_guidance_start=[u["start"] for u in units], control_guidance_end=[u["end"] for u in units])


def reproduce(pipe, source, image=None, ignore_model_hash: bool = False, progress: bool = True, mask_image=None,
              controlnet=None, control_image=None):
    """Draw the image(s) of a recipe again with `pipe`; see `LatentDiffusionPipeline.reproduce`."""
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
    with fast_as(first.fast, pipe):
        return _draw(pipe, recipes, image, ignore_model_hash, progress, mask_image, controlnet, control_image)


@contextlib.contextmanager
def fast_as(wanted: bool, pipe):
    """Fast mode (`enable_fast`, the model's own LoRA) on or off as a recipe was drawn, and back after."""
    mode = pipe.fast_mode
    if bool(wanted) == (mode is not None):
        yield
        return
    if wanted:
        pipe.enable_fast()
    else:
        pipe.disable_fast()
    try:
        yield
    finally:
        if mode is not None:
            pipe.enable_fast(mode.source)
        else:
            pipe.disable_fast()


def _draw(pipe, recipes, image, ignore_model_hash, progress, mask_image, controlnet, control_image):
    """Check the adapters and model against the first recipe, then draw them all."""
    import copy

    first = recipes[0]
    _check_loras(first, pipe)
    _check_embeddings(first, pipe)
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
    mask = _mask(first, mask_image, reference)
    twin = copy.copy(pipe)  # shares the models; only its scheduler is the recipe's
    twin.scheduler = _scheduler_for(first, pipe)
    callback = None
    if first.steps_run is not None:  # the original loop was stopped after this many steps (or ran them all)
        callback = lambda step, timestep, latents: step + 1 < first.steps_run  # noqa: E731
    arguments = {f.name: getattr(first, f.name) for f in fields_of(CALL)}
    arguments.update({f.name: [getattr(r, f.name) for r in recipes] for f in fields_of(IMAGE)})
    arguments.update({f.name: [getattr(r, f.name) for r in recipes] if any(getattr(r, f.name) for r in recipes)
                      else None for f in fields_of(PROMPT)})
    if not any(arguments["negative_prompt"]):
        arguments["negative_prompt"] = None  # the empty prompt's pixels, without encoding "" per image
    for f in fields_of(CALL):  # settings a recipe keeps as None when they did nothing (strength for text-to-image)
        if arguments[f.name] is None and meta(f.name).only_with:
            arguments[f.name] = default(f.name)
    arguments["clip_model"] = _clip_for(first, pipe) if first.clip_guidance_scale else None
    arguments.update(_controls(first, pipe, controlnet, control_image))
    return twin(**arguments, image=reference, mask_image=mask, callback=callback, progress=progress)


def _clip_for(recipe: Recipe, pipe):
    """The CLIP a CLIP-guided image was steered with, loaded from the name it recorded, weights checked."""
    from ..guidance.clip import clip_for

    name, _, digest = (recipe.clip_model or "").rpartition("@")
    clip = clip_for(None if name == "shapes_clip" else name, pipe.device)
    if not clip.name.endswith(f"@{digest}"):
        raise ValueError(f"`source`: the image was steered by CLIP {recipe.clip_model!r}, but the CLIP found there "
                         f"has weights {clip.name.rpartition('@')[2]}; draw it with that CLIP's recipe fields by hand")
    return clip


def _check_loras(recipe: Recipe, pipe) -> None:
    """Refuse to draw again unless the same LoRA files act at the same scales."""
    from ..adapters.lora import recipe_of

    def signature(loras):
        return sorted((l.get("sha256") or l["name"], float(l["scale"])) for l in loras or [])

    wanted, present = recipe.loras or [], recipe_of(pipe).get("loras", [])
    if signature(wanted) != signature(present):
        def describe(loras):
            return ", ".join(f"{l['name']} ({(l.get('sha256') or '?')[:12]}, scale {l['scale']:g})" for l in loras) \
                or "none"
        raise ValueError(f"`source`: the image was drawn with LoRA adapters {describe(wanted)}; this pipeline has "
                         f"{describe(present)}; load_lora_weights / set_adapters to match")


def _check_embeddings(recipe: Recipe, pipe) -> None:
    """Refuse to draw again unless the same textual-inversion files are loaded under the same tokens."""
    def signature(embeddings):
        return sorted((e["token"], e.get("sha256"), e["vectors"]) for e in embeddings or [])

    wanted, present = recipe.embeddings, list(pipe.embeddings.values())
    if signature(wanted) != signature(present):
        def describe(embeddings):
            return ", ".join(f"{e['token']} ({(e.get('sha256') or '?')[:12]})" for e in embeddings or []) or "none"
        raise ValueError(f"`source`: the image was drawn with textual-inversion embeddings {describe(wanted)}; this "
                         f"pipeline has {describe(present)}; load_textual_inversion to match")
