"""AUTOMATIC1111's `parameters` text ("infotext"), the recipe format other Stable Diffusion tools read.

    a red circle in the top left
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ...

The prompt comes first (it may span lines); `Negative prompt: ...` follows when there is one;
the last line holds `Key: value` settings, a value JSON-quoted when it holds `,` `:` `"` or a
newline. Written and read here as plain dicts keyed by our `Recipe` field names.

A1111 reads every prompt's `(word:1.3)` weights and cuts it at `AND` into composed parts; text read
from such a tool turns both on (`prompt_weighting`, and `prompt_composition` when the prompt has an
AND), so that it is drawn as that tool drew it.
"""

from __future__ import annotations

import json
import re

from ..guidance.composition import split_prompt
from ..settings import fields_of, meta

HASH_SHOWN = 10  # hex digits of the model hash that A1111 shows

# our scheduler names -> A1111's sampler names ("dpm++_karras" adds "Schedule type: Karras")
SAMPLERS = {"ddim": "DDIM", "pndm": "PNDM", "euler": "Euler", "euler_a": "Euler a", "dpm++": "DPM++ 2M",
            "dpm++_karras": "DPM++ 2M", "lms": "LMS", "heun": "Heun", "ddpm": "DDPM", "unipc": "UniPC", "lcm": "LCM",
            "tcd": "TCD"}


# (key, setting) of the settings with an infotext key beyond those every line has
_OPTIONAL = [(meta(f.name).infotext, f.name) for f in fields_of(infotext=True)
             if meta(f.name).infotext not in ("Steps", "CFG scale", "Seed")]


def _kind(recipe_type) -> type:
    """int, float or str: what an infotext value is read as, from the setting's recipe type (`int | None`, ...)."""
    return {int: int, int | None: int, str: str, str | None: str}.get(recipe_type, float)


_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}  # ours -> A1111's upscaler names


def _words(value):
    """Our names of choices ("latent_noise") as A1111 writes them ("latent noise")."""
    return value.replace("_", " ") if isinstance(value, str) else value


def _number(value: float) -> str:
    return f"{value:g}" if float(value) == float(f"{value:g}") else repr(float(value))


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def format_parameters(recipe, version: str = "") -> str:
    """A recipe (anything with `Recipe`'s fields) as A1111's `parameters` text."""
    settings = {"Steps": recipe.num_inference_steps, "Sampler": SAMPLERS.get(recipe.scheduler, recipe.scheduler)}
    if recipe.scheduler == "dpm++_karras":
        settings["Schedule type"] = "Karras"
    settings.update({"CFG scale": _number(recipe.guidance_scale), "Seed": recipe.seed,
                     "Size": f"{recipe.width}x{recipe.height}"})
    if recipe.model_hash:
        settings["Model hash"] = recipe.model_hash[:HASH_SHOWN]
    settings["Model"] = recipe.model
    if getattr(recipe, "padding_mask_crop", None) is not None:
        settings["Inpaint area"] = "Only masked"
    for key, name in _OPTIONAL:  # the settings A1111 writes only when they are not their default
        value = getattr(recipe, name)
        if value != meta(name).recipe_default:
            settings[key] = _number(value) if isinstance(value, float) else _words(value)
    if getattr(recipe, "hires_fix", False):  # A1111 writes the hires pass's strength as the denoising strength
        settings["Denoising strength"] = _number(recipe.hires_strength)
        settings["Hires upscaler"] = _UPSCALERS.get(recipe.hires_upscaler, recipe.hires_upscaler)
        if recipe.hires_width or recipe.hires_height:
            settings["Hires resize"] = f"{recipe.hires_width or 0}x{recipe.hires_height or 0}"
    if getattr(recipe, "clip_skip", None):  # A1111 counts the last layer as 1: our clip_skip=1 is its "Clip skip: 2"
        settings["Clip skip"] = recipe.clip_skip + 1
    for i, unit in enumerate(getattr(recipe, "controlnets", None) or []):  # as sd-webui-controlnet writes them
        settings[f"ControlNet {i}"] = (f"Module: none, Model: {unit['name']} [{unit['digest'][:8]}], Weight: "
                                       f"{_number(unit['scale'])}, Guidance Start: {_number(unit['start'])}, "
                                       f"Guidance End: {_number(unit['end'])}")
    if getattr(recipe, "embeddings", None):  # A1111's field: token and the first 12 hex digits of the file's SHA-256
        settings["TI hashes"] = ", ".join(f"{e['token']}: {(e.get('sha256') or '')[:12]}" for e in recipe.embeddings)
    if getattr(recipe, "loras", None):  # A1111's field: name and the first 12 hex digits of the file's SHA-256
        settings["Lora hashes"] = ", ".join(f"{l['name']}: {(l.get('sha256') or '')[:12]}" for l in recipe.loras)
    settings["Version"] = f"ldm-pipeline {version}".strip()
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None)
    negative = f"\nNegative prompt: {recipe.negative_prompt}" if recipe.negative_prompt else ""
    return f"{recipe.prompt}{negative}\n{line}"


def _split_settings(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value", ...` -> {key: value}."""
    settings = {}
    for match in re.finditer(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            value = json.loads(value)
        settings[key] = value
    return settings


def _hires(settings: dict[str, str], fields: dict) -> dict:
    """A1111's hires fix keys -> our settings (its "Denoising strength" is then the hires pass's)."""
    hires = dict(hires_fix=True, strength=None, hires_strength=fields.get("strength", 0.7))
    upscaler = settings.get("Hires upscaler", "Latent")
    hires["hires_upscaler"] = {v: k for k, v in _UPSCALERS.items()}.get(upscaler, upscaler)
    if "Hires resize" in settings:
        width, height = (int(v) for v in settings["Hires resize"].split("x"))
        hires.update(hires_width=width or None, hires_height=height or None)
    return hires


def split_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111's `parameters` text -> (prompt, negative prompt, {key: value} of the settings line, as text).

    Without a settings line (no `Steps:`), all of the text is the prompt and the settings are {}.
    """
    lines = text.strip().split("\n")
    settings = _split_settings(lines[-1]) if len(lines) > 1 else {}
    if "Steps" not in settings:
        return text.strip(), "", {}
    body = "\n".join(lines[:-1])
    prompt, _, negative = body.partition("\nNegative prompt:")
    if body.startswith("Negative prompt:"):
        prompt, negative = "", body[len("Negative prompt:"):]
    return prompt.strip(), negative.strip(), settings


def parse_parameters(text: str, source: str = "parameters") -> dict:
    """A1111's `parameters` text -> `Recipe` fields (only those the text gives).

    Args:
        source: the file it came from, for error messages.
    """
    prompt, negative, settings = split_parameters(text)
    if "Steps" not in settings:
        raise ValueError(f"`path`: the 'parameters' chunk of {source!r} has no settings line (Steps: ...)")
    sampler = settings.get("Sampler", "DDIM")
    karras = settings.get("Schedule type", "").lower() == "karras" or sampler.endswith(" Karras")
    sampler = sampler.removesuffix(" Karras")
    names = [ours for ours, theirs in SAMPLERS.items() if theirs == sampler]
    scheduler = ("dpm++_karras" if karras else "dpm++") if sampler == "DPM++ 2M" else (names[0] if names else sampler)
    fields = dict(prompt=prompt, negative_prompt=negative, scheduler=scheduler,
                  model=settings.get("Model"), model_hash=settings.get("Model hash"),
                  prompt_weighting=True, prompt_composition=len(split_prompt(prompt)) > 1)
    try:
        fields["num_inference_steps"] = int(settings["Steps"])
        fields["width"], fields["height"] = (int(v) for v in settings.get("Size", "512x512").split("x"))
        for f in fields_of(infotext=True):
            key = meta(f.name).infotext
            if key in settings and key != "Steps":
                kind = _kind(meta(f.name).recipe_type)
                fields[f.name] = kind(settings[key]) if kind is not str else settings[key].replace(" ", "_")
        if int(settings.get("Clip skip", 1)) > 1:
            fields["clip_skip"] = int(settings["Clip skip"]) - 1
        if "Hires upscale" in settings or "Hires resize" in settings:
            fields.update(_hires(settings, fields))
    except ValueError as error:
        raise ValueError(f"`path`: the 'parameters' chunk of {source!r} has a value that is not a number "
                         f"({error})") from error
    return fields
