"""A1111 requests -> pipeline calls, and pipeline outputs -> A1111 answers, for the HTTP API (`api`).

Everything here runs before the pipeline does any work and raises ValueError (the API answers 400)
for what cannot be drawn: limits passed, unknown samplers, features this server lacks, pictures that
do not decode. Imports neither fastapi nor gradio.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import re
import warnings
from dataclasses import dataclass, field

import PIL.Image

from .. import __version__
from ..conditioning import preprocess
from ..masks import MASKED_CONTENT
from ..provenance import png
from ..provenance.infotext import SAMPLERS, split_parameters
from .api_config import ApiConfig, Entry, check_name
from .api_models import ControlNetUnit

FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}  # A1111's inpainting_fill
assert set(FILLS.values()) == set(MASKED_CONTENT)
SCHEDULE_TYPES = {"automatic": "Automatic", "karras": "Karras"}  # A1111's `scheduler` field (its schedule type)
SAMPLER_NAMES = {theirs: ours for ours, theirs in SAMPLERS.items() if ours != "dpm++_karras"}
CONTROL_MODULES = ("none", "canny", "scribble")
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
RANDOM_SEEDS = 2**32  # a random seed (-1) is drawn below this, as A1111 does


def scheduler_of(sampler_name: str | None, schedule: str | None) -> str | None:
    """A1111's sampler name and schedule type -> our scheduler name (None: the model's own)."""
    sampler = (sampler_name or "").strip()
    schedule = (schedule or "automatic").strip().lower()
    if schedule not in SCHEDULE_TYPES and schedule not in (s.lower() for s in SCHEDULE_TYPES.values()):
        raise ValueError(f"scheduler: got {schedule!r}; expected one of {list(SCHEDULE_TYPES)}")
    if sampler.endswith(" Karras"):  # older A1111 names: "DPM++ 2M Karras"
        sampler, schedule = sampler.removesuffix(" Karras"), "karras"
    if not sampler:
        if schedule == "karras":
            raise ValueError("scheduler: 'karras' needs sampler_name 'DPM++ 2M'")
        return None
    found = next((ours for theirs, ours in SAMPLER_NAMES.items() if theirs.lower() == sampler.lower()), None)
    if found is None:
        found = sampler if sampler in SAMPLERS else None  # our own names work too
    if found is None:
        raise ValueError(f"sampler_name: got {sampler_name!r}; expected one of {list(SAMPLER_NAMES)}")
    if schedule == "karras":
        if found not in ("dpm++", "dpm++_karras"):
            raise ValueError(f"scheduler: 'karras' goes with sampler_name 'DPM++ 2M' only, not {sampler_name!r}")
        return "dpm++_karras"
    return found


def decode_picture(text, what: str, max_pixels: int, mode: str = "RGB") -> PIL.Image.Image:
    """A base64 picture (a data: URL prefix allowed) -> a PIL image, its size checked before it is decoded."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what}: expected a base64-encoded picture")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            picture = PIL.Image.open(io.BytesIO(data))
            if picture.width * picture.height > max_pixels:
                raise ValueError(f"{what}: {picture.width}x{picture.height} is more than the server's limit of "
                                 f"{max_pixels} pixels")
            picture.load()
    except ValueError:
        raise
    except Exception as error:  # PIL raises many kinds on damaged files (OSError, SyntaxError, EOFError, ...)
        raise ValueError(f"{what}: not a readable picture ({type(error).__name__})") from None
    return picture if mode is None else _mode(picture, mode)


def _mode(picture: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    if mode == "RGB" and picture.mode in ("RGBA", "LA", "PA", "P"):
        rgba = picture.convert("RGBA")  # transparent parts on white, as the page does
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return picture.convert(mode) if picture.mode != mode else picture


def png_base64(image: PIL.Image.Image, recipe) -> str:
    """A PNG carrying the recipe (the chunks `PipelineOutput.save` writes), base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png.png_info([recipe]))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def picture_base64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`<lora:NAME:WEIGHT>` tags (A1111's extra networks) taken out of a prompt -> (prompt, [(name, weight)])."""
    found = []
    for match in _LORA_TAG.finditer(prompt):
        weight = match.group(2)
        try:
            found.append((match.group(1).strip(), float(weight) if weight not in (None, "") else 1.0))
        except ValueError:
            raise ValueError(f"prompt: {match.group(0)!r}: the weight is not a number") from None
    return re.sub(r"\s{2,}", " ", _LORA_TAG.sub("", prompt)).strip(" ,"), found


def adapter_names(loras: list[tuple[Entry, float]]) -> list[str]:
    """Adapter names from LoRA names: what peft accepts (no '.', not a torch.nn.Module attribute), each once."""
    import torch

    names = []
    for entry, _ in loras:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", entry.name.rsplit("/", 1)[-1]) or "lora"
        if hasattr(torch.nn.ModuleDict(), name) or name in names:
            name = f"lora{len(names)}_{name}"
        names.append(name)
    return names


def check_supported(request, img2img: bool) -> None:
    """Refuse what A1111 can do and this server cannot (rather than draw something else).

    The hires fix's own checkpoint, sampler and prompts are refused; its other fields map to the pipeline's.
    """
    r = request
    refused = [
        (r.enable_hr and r.hr_checkpoint_name not in (None, "", "Use same checkpoint"),
         "hr_checkpoint_name: the hires pass uses the same model"),
        (r.enable_hr and r.hr_sampler_name not in (None, "", "Use same sampler"),
         "hr_sampler_name: the hires pass uses the same sampler"),
        (r.enable_hr and (r.hr_prompt or r.hr_negative_prompt), "hr_prompt: the hires pass uses the same prompts"),
        (r.restore_faces, "restore_faces: face restoration is not available"),
        (r.tiling, "tiling: tiling is not available"),
        (r.styles, "styles: saved prompt styles are not available; put them in the prompt"),
        (r.subseed_strength, "subseed_strength: variation seeds are not available"),
        (r.s_churn, "s_churn: not available"),
        (r.s_noise not in (None, 1), "s_noise: only 1 is available"),
        (r.script_name, f"script_name: scripts are not available (got {r.script_name!r})"),
        (r.save_images, "save_images: images are sent back, never kept on the server"),
        (r.refiner_checkpoint not in (None, "", "None"), "refiner_checkpoint: refiners are not available"),
        (r.infotext, "infotext: not read; send the fields"),
    ]
    if img2img:
        refused += [
            (r.resize_mode != 0, "resize_mode: only 0 (just resize) is available"),
            (r.initial_noise_multiplier not in (None, 1), "initial_noise_multiplier: only 1 is available"),
            (r.latent_mask, "latent_mask: not available"),
            (r.mask_blur is None and r.mask_blur_x != r.mask_blur_y,
             "mask_blur_x, mask_blur_y: one blur for both directions is available; send mask_blur"),
        ]
    for asked, message in refused:
        if asked:
            raise ValueError(message)
    unknown = set(r.override_settings or {}) - {"sd_model_checkpoint"}
    if unknown:
        raise ValueError(f"override_settings: only sd_model_checkpoint can be overridden (got {sorted(unknown)})")


HIRES_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}  # A1111's names (lower case) -> ours


def hires_arguments(request) -> dict:
    """A txt2img request's hires fix (enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps, hr_resize_x/y,
    denoising_strength) as the pipeline's hires settings."""
    upscaler = (request.hr_upscaler or "Latent").lower()
    if upscaler not in HIRES_UPSCALERS:
        raise ValueError(f"hr_upscaler: got {request.hr_upscaler!r}; expected Latent or Lanczos")
    strength = request.denoising_strength if request.denoising_strength is not None else 0.7
    return dict(hires_fix=True, hires_scale=request.hr_scale, hires_upscaler=HIRES_UPSCALERS[upscaler],
                hires_steps=request.hr_second_pass_steps or None, hires_strength=strength,
                hires_width=request.hr_resize_x or None, hires_height=request.hr_resize_y or None)


def check_limits(request, config: ApiConfig, default_steps: int) -> None:
    """The server's limits (`api_config.Limits`), on the values the call would use."""
    limits = config.limits
    checked = [("width", request.width, limits.size), ("height", request.height, limits.size),
               ("steps", request.steps or default_steps, limits.steps),
               ("batch_size", request.batch_size, limits.batch),
               ("batch_size x n_iter", request.batch_size * request.n_iter, limits.images),
               ("prompt (characters)", len(request.prompt), limits.prompt),
               ("negative_prompt (characters)", len(request.negative_prompt), limits.prompt)]
    if getattr(request, "enable_hr", False):  # the hires pass's size (the model's own size is at most `size` too)
        side = max(request.width or 0, request.height or 0)  # 0: the model's own size, which the guard checks
        scaled = int(side * request.hr_scale) if side and not (request.hr_resize_x or request.hr_resize_y) else None
        checked += [("hr_resize_x", request.hr_resize_x, limits.size), ("hr_resize_y", request.hr_resize_y, limits.size),
                    ("hires size (hr_scale x the size)", scaled, limits.size)]
    if hasattr(request, "mask_blur"):
        checked += [("mask_blur", max(request.mask_blur or 0, request.mask_blur_x), limits.size),
                    ("inpaint_full_res_padding", request.inpaint_full_res_padding, limits.size)]
    for name, value, limit in checked:
        if value is not None and value > limit:
            raise ValueError(f"{name}: {value} is more than the server's limit of {limit}")


@dataclass
class Plan:
    """A request as pipeline calls: the arguments of each batch, and what the call needs loaded."""

    arguments: dict  # pipe(...) keyword arguments shared by every batch
    scheduler: str | None  # our name; None: the model's own
    seed: int  # the first image's seed
    batches: int  # n_iter
    loras: list[tuple[Entry, float]] = field(default_factory=list)
    controlnets: list[Entry] = field(default_factory=list)  # one per unit, with `arguments`' control pictures
    model: str | None = None  # override_settings.sd_model_checkpoint (checked as a name, not yet found)


def plan(request, config: ApiConfig, img2img: bool, default_steps: int) -> Plan:
    """Check a txt2img or img2img request and turn it into pipeline arguments (`default_steps`: the model's)."""
    check_supported(request, img2img)
    check_limits(request, config, default_steps)
    prompt, tags = lora_tags(request.prompt)
    arguments = dict(prompt=prompt, negative_prompt=request.negative_prompt or None,
                     num_inference_steps=request.steps, guidance_scale=request.cfg_scale, width=request.width,
                     height=request.height, num_images_per_prompt=request.batch_size)
    if request.eta is not None:
        arguments["eta"] = request.eta
    if not img2img and request.enable_hr:
        arguments.update(hires_arguments(request))
    max_pixels = config.limits.picture_pixels
    if img2img:
        if len(request.init_images) != 1:
            raise ValueError(f"init_images: got {len(request.init_images)} pictures; expected one")
        arguments["image"] = decode_picture(request.init_images[0], "init_images[0]", max_pixels)
        arguments["strength"] = request.denoising_strength if request.denoising_strength is not None else 0.75
        if request.mask is not None:
            mask = decode_picture(request.mask, "mask", max_pixels, mode="L")
            if request.inpainting_mask_invert:
                mask = PIL.Image.eval(mask, lambda v: 255 - v)
            arguments.update(mask_image=mask, masked_content=FILLS[request.inpainting_fill],
                             mask_blur=request.mask_blur if request.mask_blur is not None else request.mask_blur_x,
                             padding_mask_crop=request.inpaint_full_res_padding if request.inpaint_full_res else None)
    loras = [] if request.disable_extra_networks else \
        [(config.find("lora", f"prompt: <lora:{name}>", name), weight) for name, weight in tags]
    units = controlnet_units(request.alwayson_scripts, config, arguments.get("image"))
    if units:
        arguments.update(control_image=[u["picture"] for u in units],
                         controlnet_conditioning_scale=[u["weight"] for u in units],
                         control_guidance_start=[u["start"] for u in units],
                         control_guidance_end=[u["end"] for u in units],
                         guess_mode=units[0]["guess"])
    override = (request.override_settings or {}).get("sd_model_checkpoint")
    model = None if override is None else check_name("override_settings.sd_model_checkpoint", override)
    if request.seed < -1:
        raise ValueError(f"seed: got {request.seed}; expected -1 (a random seed) or an integer >= 0")
    seed = request.seed if request.seed != -1 else random.randrange(RANDOM_SEEDS)
    return Plan(arguments=arguments, scheduler=scheduler_of(request.sampler_name or request.sampler_index,
                                                            request.scheduler),
                seed=seed, batches=request.n_iter, loras=loras, controlnets=[u["entry"] for u in units], model=model)


def _control_mode(unit) -> bool:
    """sd-webui-controlnet's control mode -> guess_mode."""
    mode = unit.control_mode
    if unit.guessmode:
        return True
    if mode in (0, "Balanced", "0"):
        return False
    if mode in (2, "ControlNet is more important", "2"):
        return True
    raise ValueError(f"controlnet: control_mode {mode!r} is not available; expected 0 (Balanced) or 2 (ControlNet "
                     "is more important)")


def controlnet_units(scripts: dict, config: ApiConfig, init_image) -> list[dict]:
    """The enabled units of `alwayson_scripts.controlnet` (any case), checked, their pictures prepared."""
    found = [value for key, value in (scripts or {}).items() if key.lower() == "controlnet"]
    if not found:
        return []
    args = found[0].get("args", []) if isinstance(found[0], dict) else None
    if not isinstance(args, list):
        raise ValueError("alwayson_scripts.controlnet: expected {\"args\": [unit, ...]}")
    units = []
    for i, raw in enumerate(args):
        if not isinstance(raw, dict):
            raise ValueError(f"alwayson_scripts.controlnet.args[{i}]: expected an object (a ControlNet unit)")
        unit = ControlNetUnit.model_validate(raw)
        if not unit.enabled or unit.model in (None, "", "None", "none"):
            continue
        what = f"alwayson_scripts.controlnet.args[{i}]"
        if unit.mask:
            raise ValueError(f"{what}.mask: unit masks are not available")
        if (unit.module or "none") not in CONTROL_MODULES:
            raise ValueError(f"{what}.module: got {unit.module!r}; expected one of {list(CONTROL_MODULES)}")
        source = unit.image.get("image") if isinstance(unit.image, dict) else (unit.image or unit.input_image)
        if source:
            picture = decode_picture(source, f"{what}.image", config.limits.picture_pixels)
        elif init_image is not None:
            picture = init_image
        else:
            raise ValueError(f"{what}.image: a control picture is needed with txt2img")
        picture = _preprocess(unit, picture, what)
        units.append(dict(entry=config.find("controlnet", f"{what}.model", unit.model), picture=picture,
                          weight=unit.weight, start=unit.guidance_start, end=unit.guidance_end,
                          guess=_control_mode(unit)))
    if len(units) > config.limits.controlnets:
        raise ValueError(f"alwayson_scripts.controlnet: {len(units)} units is more than the server's limit of "
                         f"{config.limits.controlnets}")
    if len({u["guess"] for u in units}) > 1:
        raise ValueError("alwayson_scripts.controlnet: the units' control modes differ; one mode for all is available")
    return units


def _preprocess(unit, picture, what: str):
    module = unit.module or "none"
    if module == "none":
        return picture
    if module == "canny":
        low = int(unit.threshold_a) if unit.threshold_a >= 0 else 100
        high = int(unit.threshold_b) if unit.threshold_b >= 0 else 200
        try:
            return preprocess.canny(picture, low, high)
        except ValueError as error:
            raise ValueError(f"{what}.threshold_a, threshold_b: {error}") from None
    threshold = int(unit.threshold_a) if unit.threshold_a > 0 else 128
    try:
        return preprocess.scribble(picture, threshold)
    except ValueError as error:
        raise ValueError(f"{what}.threshold_a: {error}") from None


def info(request, results: list, recipes: list[list], model_name: str) -> str:
    """A1111's `info` JSON string for the outputs of a request's batches (`recipes`: each output's `recipes()`)."""
    recipes = [recipe for drawn in recipes for recipe in drawn]
    first = recipes[0] if recipes else None
    model_hash = first.model_hash if first else None
    seeds = [r.seed for r in recipes]
    return json.dumps({
        "prompt": request.prompt, "all_prompts": [r.prompt for r in recipes],
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [r.negative_prompt for r in recipes],
        "seed": seeds[0] if seeds else request.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": first.width if first else request.width,
        "height": first.height if first else request.height,
        "sampler_name": SAMPLERS.get(first.scheduler, first.scheduler) if first else request.sampler_name,
        "scheduler": "Karras" if first and first.scheduler == "dpm++_karras" else "Automatic",
        "cfg_scale": first.guidance_scale if first else request.cfg_scale,
        "steps": first.num_inference_steps if first else request.steps,
        "steps_run": [result.steps_run for result in results],
        "batch_size": request.batch_size, "n_iter": request.n_iter,
        "denoising_strength": getattr(first, "strength", None), "eta": first.eta if first else request.eta,
        "sd_model_name": model_name, "sd_model_hash": (model_hash or "")[:10] or None,
        "infotexts": [r.parameters() for r in recipes], "index_of_first_image": 0, "styles": [],
        "extra_generation_params": {}, "version": f"ldm-pipeline {__version__}",
    })


def png_parameters(text: str) -> dict:
    """A1111's `parameters` text as png-info's `parameters`: Prompt, Negative prompt, the settings, Size-1/2."""
    prompt, negative, settings = split_parameters(text)
    found = {"Prompt": prompt, "Negative prompt": negative, **settings}
    width, _, height = settings.get("Size", "").partition("x")
    if width and height:
        found.update({"Size-1": width, "Size-2": height})
    return found
