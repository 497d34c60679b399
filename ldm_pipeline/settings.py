"""Every setting of a pipeline call, named once: `GenerationSettings`.

Each field carries, beside its default, what the rest of the house needs to know about it (its
`Setting` metadata): the check of its value alone, how an image's recipe keeps it, its key in
AUTOMATIC1111's infotext and its `ldm generate` flag. `LatentDiffusionPipeline.__call__` turns its
arguments into settings; the recipe, `reproduce`, the infotext, the CLI and the web page read the
fields from here. A new setting touches this dataclass, the stage that uses it and the interfaces
that show it.

`resolve` fills in what a call leaves to the model (steps, guidance, size) and runs every check,
so that bad input fails before any model works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .masks import MASKED_CONTENT
from .runtime import checks

IMAGE, PROMPT, CALL = "image", "prompt", "call"  # a recipe keeps a value per image, per prompt or per call


@dataclass(frozen=True)
class Setting:
    """What is known of one setting besides its default.

    Attributes:
        check: `check(value)` raises naming the setting when the value alone is wrong (None: checked
            with others in `checks.check_call`, or not at all).
        recorded: how a recipe keeps it: IMAGE (one value per image), PROMPT (per prompt), CALL (one
            for the call), or None (not kept: callbacks, tensors, generators).
        recipe_type, recipe_default: the type and default of its `Recipe` field.
        infotext: its key in A1111's `parameters` text, where that tool has one.
        flag, flag_options: its `ldm generate` flag and argparse options (`dest` is the setting's name).
        only_with: a setting without which this one does nothing: the recipe keeps None when that is None
            or False (strength without an image, mask blur without a mask, hires steps without hires fix).
    """

    check: Callable[[Any], None] | None = None
    recorded: str | None = CALL
    recipe_type: Any = None
    recipe_default: Any = None
    infotext: str | None = None
    flag: str | None = None
    flag_options: dict = field(default_factory=dict)
    only_with: str | None = None


def setting(default=None, **metadata) -> Any:
    """A dataclass field with its `Setting` metadata."""
    return field(default=default, metadata={"setting": Setting(**metadata)})


def _choice(name: str, accepted: tuple) -> Callable[[Any], None]:
    def check(value):
        if value not in accepted:
            raise ValueError(f"`{name}`: got {value!r}; expected one of {list(accepted)}")
    return check


def _pixels(name: str, optional: bool = False) -> Callable[[Any], None]:
    def check(value):
        if not (optional and value is None) and not (checks.is_int(value) and value >= 0):
            raise ValueError(f"`{name}`: got {value!r}; expected {'None or ' if optional else ''}an integer >= 0 "
                             "(pixels)")
    return check


def _hires_scale(value) -> None:
    checks.finite_number("hires_scale", value, "a number >= 1 (the hires fix's upscale)")
    if value < 1:
        raise ValueError(f"`hires_scale`: got {value!r}; expected a number >= 1 (the hires fix's upscale)")


def _hires_strength(value) -> None:
    checks.finite_number("hires_strength", value, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise ValueError(f"`hires_strength`: got {value!r}; expected a number in (0, 1]")


def _bool(name: str) -> Callable[[Any], None]:
    def check(value):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}`: got {value!r}; expected True or False")
    return check


def _clip_skip(value) -> None:
    if value is not None and not (checks.is_int(value) and value >= 0):
        raise ValueError(f"`clip_skip`: got {value!r}; expected None or an integer >= 0 (text encoder layers to skip)")


def _fraction(name: str) -> Callable[[Any], None]:
    def check(value):
        if value is None:
            return
        checks.finite_number(name, value, "None or a number in (0, 1) (a share of the schedule)")
        if not 0 < value < 1:
            raise ValueError(f"`{name}`: got {value!r}; expected None or a number in (0, 1) (a share of the schedule)")
    return check


def _pair(name: str, zero: bool = False) -> Callable[[Any], None]:
    def check(value):
        if value is None:
            return
        low = 0 if zero else 1
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(checks.is_int(v) and v >= low
                                                                            for v in value)):
            raise ValueError(f"`{name}`: got {value!r}; expected None or (height, width): two integers >= {low}"
                             if name.endswith("size") else
                             f"`{name}`: got {value!r}; expected None or (top, left): two integers >= {low}")
    return check


def _score(name: str) -> Callable[[Any], None]:
    def check(value):
        checks.finite_number(name, value, "a number (an aesthetic score, about 1 to 10)")
    return check


@dataclass(frozen=True)
class GenerationSettings:
    """The settings of one call, in `LatentDiffusionPipeline.__call__`'s names and order (diffusers' names).

    None for `num_inference_steps`, `guidance_scale`, `height` and `width` means the model's own
    (`resolve` fills them in). See `LatentDiffusionPipeline.__call__` for each argument's meaning.
    """

    prompt: str | list[str] | None = setting(recorded=IMAGE, recipe_type=str, recipe_default="")
    negative_prompt: str | list[str] | None = setting(
        recorded=IMAGE, recipe_type=str, recipe_default="",
        flag="--negative-prompt", flag_options=dict(help="what to steer away from (default: the empty prompt)"))
    num_inference_steps: int | None = setting(
        recipe_type=int, recipe_default=50, infotext="Steps", check=checks.check_steps,
        flag="--steps", flag_options=dict(type=int, help="denoising steps (default: the model's, else 50)"))
    guidance_scale: float | None = setting(
        recipe_type=float, recipe_default=7.5, infotext="CFG scale", check=checks.check_guidance,
        flag="--guidance", flag_options=dict(type=float, help="guidance scale (default: the model's)"))
    height: int | None = setting(recipe_type=int, recipe_default=512)
    width: int | None = setting(recipe_type=int, recipe_default=512)
    num_images_per_prompt: int = setting(
        1, recorded=None, check=checks.check_images_per_prompt,
        flag="--num-images", flag_options=dict(type=int, help="images per prompt; more than one makes a grid"))
    generator: torch.Generator | list[torch.Generator] | None = setting(recorded=None)
    seed: int | list[int] | None = setting(
        recorded=IMAGE, recipe_type=int | None, infotext="Seed",
        flag="--seed", flag_options=dict(type=int, help="image i uses seed+i (default: random)"))
    latents: torch.Tensor | None = setting(recorded=None)
    prompt_embeds: torch.Tensor | None = setting(recorded=None)
    negative_prompt_embeds: torch.Tensor | None = setting(recorded=None)
    image: Any = setting(recorded=None, flag="--image", flag_options=dict(help="reference picture for "
                                                                              "image-to-image"))
    strength: float = setting(
        0.8, recipe_type=float | None, infotext="Denoising strength", check=checks.check_strength, only_with="image",
        flag="--strength", flag_options=dict(type=float, help="image-to-image strength in (0, 1]"))
    output_type: str = setting("pil", recorded=None, check=checks.check_output_type)
    callback: Callable | None = setting(recorded=None, check=checks.check_callback)
    progress: bool = setting(True, recorded=None)
    eta: float = setting(0.0, recipe_type=float, recipe_default=0.0, infotext="Eta", check=checks.check_eta)
    prompt_weighting: bool = setting(False, recipe_type=bool, recipe_default=False,
                                     check=_bool("prompt_weighting"))
    prompt_composition: bool = setting(
        False, recipe_type=bool, recipe_default=False,
        flag="--prompt-composition", flag_options=dict(action="store_true", help=(
            "read 'A AND B :0.5' as composed prompts, each part guiding on its own (AUTOMATIC1111's AND)")))
    regions: list | None = setting(recorded=PROMPT, recipe_type=list | None)
    clip_guidance_scale: float = setting(
        0.0, recipe_type=float, recipe_default=0.0,
        flag="--clip-guidance", flag_options=dict(type=float, metavar="SCALE", help=(
            "steer each step with a CLIP's gradient (default 0: off; about 0.2-0.5 on the bundled model; costs a "
            "VAE decode and a CLIP pass per step)")))
    clip_model: Any = setting(
        recipe_type=str | None,  # recorded as the CLIP's name@weights-digest
        flag="--clip-model", flag_options=dict(help="the CLIP for --clip-guidance: a CLIPModel folder or Hub id "
                                                    "(default: the bundled one)"))
    clip_guidance_every: int = setting(1, recipe_type=int, recipe_default=1)
    preview: Callable | None = setting(recorded=None)
    preview_every: int = setting(
        5, recorded=None,
        flag="--preview-every", flag_options=dict(type=int, metavar="K", help="steps between previews (default 5)"))
    # inpainting (conditioning/inpaint.py): white in the mask is repainted, the rest given back as it was
    mask_image: Any = setting(
        recorded=None,  # recorded as the mask's digest and file (`Recipe.mask_hash`, `mask_path`)
        flag="--mask", flag_options=dict(help="inpainting: a mask of the --image's size, white where to repaint"))
    mask_blur: int = setting(
        4, recipe_type=int | None, infotext="Mask blur", check=_pixels("mask_blur"), only_with="mask_image",
        flag="--mask-blur", flag_options=dict(type=int, metavar="PX", help=(
            "inpainting: the result is pasted over the picture through the mask blurred by this many pixels "
            "(default 4; 0: a hard edge)")))
    padding_mask_crop: int | None = setting(
        recipe_type=int | None, infotext="Masked area padding", check=_pixels("padding_mask_crop", optional=True),
        only_with="mask_image", flag="--padding-mask-crop", flag_options=dict(type=int, metavar="PX", help=(
            "inpainting: draw only a crop around the mask, with this many pixels around it, at the model's full "
            "size, and paste it back (A1111's 'inpaint only masked')")))
    masked_content: str = setting(
        "original", recipe_type=str | None, infotext="Masked content", only_with="mask_image",
        check=_choice("masked_content", MASKED_CONTENT),
        flag="--masked-content", flag_options=dict(choices=MASKED_CONTENT, help=(
            "inpainting: what the masked area starts from: the picture (original), the colours around it "
            "(fill), noise or nothing in latent space (A1111's 'masked content'; default original)")))
    # inpainting that goes on from a base's latents (`image=` latents, `denoising_start`): the picture the base
    # repainted, given back outside the mask (diffusers' IF pipelines' name for "the image `image` was varied from")
    original_image: Any = setting(recorded=None)
    # ControlNet (conditioning/controlnet.py): nets steer by pictures; recorded as `Recipe.controlnets`
    controlnet: Any = setting(  # a ControlNetModel or a list; default: the pipeline's own
        recorded=None, flag="--controlnet", flag_options=dict(action="append", metavar="PATH", help=(
            "a ControlNet (a diffusers folder, a Hub id or an original .safetensors file); repeat for several")))
    control_image: Any = setting(  # a picture, or one per net
        recorded=None, flag="--control-image", flag_options=dict(action="append", metavar="IMG", help=(
            "the picture each --controlnet follows (edges, depth, pose, ...), in the same order")))
    controlnet_conditioning_scale: float | list = setting(  # one, or one per net
        1.0, recorded=None, flag="--control-scale", flag_options=dict(action="append", type=float, metavar="S", help=(
            "how strongly the ControlNet steers (default 1); once for all, or once per net")))
    control_guidance_start: float | list = setting(  # the share of the steps each net starts at
        0.0, recorded=None, flag="--control-start", flag_options=dict(action="append", type=float, metavar="F"))
    control_guidance_end: float | list = setting(  # ... and ends at
        1.0, recorded=None, flag="--control-end", flag_options=dict(action="append", type=float, metavar="F", help=(
            "the share of the steps after which the ControlNet stops (default 1); --control-start likewise")))
    guess_mode: bool = setting(  # nets on the prompt's copy only
        False, recipe_type=bool, recipe_default=False, flag="--guess-mode", flag_options=dict(
            action="store_true", help="run the ControlNets on the prompt's copy only (the control picture leads)"))

    # hires fix (hires.py): draw at the base size, upscale, refine by image-to-image (A1111's "Hires. fix")
    hires_fix: bool = setting(
        False, recipe_type=bool, recipe_default=False, check=_bool("hires_fix"),
        flag="--hires", flag_options=dict(action="store_true", help=(
            "hires fix: draw at the base size, upscale (--hires-scale) and refine by image-to-image")))
    hires_scale: float = setting(
        2.0, recipe_type=float | None, infotext="Hires upscale", only_with="hires_fix", check=_hires_scale,
        flag="--hires-scale", flag_options=dict(type=float, metavar="X", help="hires fix: the upscale (default 2)"))
    hires_width: int | None = setting(
        recipe_type=int | None, only_with="hires_fix", flag="--hires-width", flag_options=dict(
            type=int, metavar="PX", help="hires fix: the final width instead of the scale's (A1111's hr_resize_x)"))
    hires_height: int | None = setting(
        recipe_type=int | None, only_with="hires_fix", flag="--hires-height", flag_options=dict(
            type=int, metavar="PX", help="hires fix: the final height (hr_resize_y)"))
    hires_upscaler: Any = setting(
        "latent", recipe_type=str | None, only_with="hires_fix",  # infotext: "Hires upscaler" (infotext.py)
        flag="--hires-upscaler", flag_options=dict(metavar="NAME", help=(
            "hires fix: latent (the default), lanczos, or an upscaler model file (ESRGAN and the like, read with "
            "spandrel)")))
    hires_steps: int | None = setting(
        recipe_type=int | None, infotext="Hires steps", only_with="hires_fix",
        flag="--hires-steps", flag_options=dict(type=int, metavar="N", help=(
            "hires fix: the refining pass's schedule (default: --steps); it runs int(N * strength) of them")))
    hires_strength: float = setting(
        0.7, recipe_type=float | None, only_with="hires_fix", check=_hires_strength,
        flag="--hires-strength", flag_options=dict(type=float, metavar="S", help=(
            "hires fix: the refining pass's denoising strength in (0, 1] (default 0.7)")))

    # SDXL (pipeline_xl.py, conditioning/sdxl.py): the second text tower, clip skip, the base/refiner hand-off and
    # the UNet's size and aesthetic conditions; a one-tower model refuses those it cannot use
    prompt_2: str | list[str] | None = setting(  # text_encoder_2's prompt (default: `prompt`)
        recorded=PROMPT, recipe_type=str | None)
    negative_prompt_2: str | list[str] | None = setting(  # text_encoder_2's (default: `negative_prompt`)
        recorded=PROMPT, recipe_type=str | None)
    pooled_prompt_embeds: torch.Tensor | None = setting(recorded=None)  # with prompt_embeds: text_encoder_2's pooled
    negative_pooled_prompt_embeds: torch.Tensor | None = setting(recorded=None)
    clip_skip: int | None = setting(
        recipe_type=int | None, check=_clip_skip,
        flag="--clip-skip", flag_options=dict(type=int, metavar="N", help=(
            "read the prompt N layers before the text encoder's usual one (diffusers' clip_skip; A1111's 'Clip "
            "skip' is N + 1)")))
    denoising_end: float | None = setting(  # stop at this share of the schedule (a base handing off to a refiner)
        recipe_type=float | None, check=_fraction("denoising_end"),
        flag="--denoising-end", flag_options=dict(type=float, metavar="F", help=(
            "stop after this share of the schedule (hand the latents to a refiner, which starts there)")))
    denoising_start: float | None = setting(  # image-to-image from latents already this far along the schedule
        recipe_type=float | None, check=_fraction("denoising_start"), only_with="image",
        flag="--denoising-start", flag_options=dict(type=float, metavar="F", help=(
            "image-to-image: start at this share of the schedule, the --image being latents that far along")))
    original_size: tuple[int, int] | None = setting(  # SDXL's size conditions (height, width): default the drawn size
        recipe_type=tuple | None, check=_pair("original_size"))
    crops_coords_top_left: tuple[int, int] = setting((0, 0), recipe_type=tuple, recipe_default=(0, 0),
                                                     check=_pair("crops_coords_top_left", zero=True))
    target_size: tuple[int, int] | None = setting(recipe_type=tuple | None, check=_pair("target_size"))
    negative_original_size: tuple[int, int] | None = setting(  # default: the positive ones
        recipe_type=tuple | None, check=_pair("negative_original_size"))
    negative_crops_coords_top_left: tuple[int, int] | None = setting(
        recipe_type=tuple | None, check=_pair("negative_crops_coords_top_left", zero=True))
    negative_target_size: tuple[int, int] | None = setting(recipe_type=tuple | None,
                                                           check=_pair("negative_target_size"))
    aesthetic_score: float = setting(  # a refiner's aesthetic condition (`requires_aesthetics_score` models)
        6.0, recipe_type=float, recipe_default=6.0, check=_score("aesthetic_score"))
    negative_aesthetic_score: float = setting(
        2.5, recipe_type=float, recipe_default=2.5, check=_score("negative_aesthetic_score"))

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    @property
    def is_image_to_image(self) -> bool:
        return self.image is not None

    def arguments(self) -> dict:
        """The settings as `pipe(...)` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def fields_of(recorded: str | None = None, *, flag: bool = False, infotext: bool = False) -> list[dataclasses.Field]:
    """The settings' fields, optionally only those a recipe keeps that way, or those with a flag / infotext key."""
    chosen = []
    for f in dataclasses.fields(GenerationSettings):
        meta: Setting = f.metadata["setting"]
        if recorded is not None and meta.recorded != recorded:
            continue
        if (flag and meta.flag is None) or (infotext and meta.infotext is None):
            continue
        chosen.append(f)
    return chosen


def meta(name: str) -> Setting:
    """The `Setting` metadata of a field."""
    return GenerationSettings.__dataclass_fields__[name].metadata["setting"]


def default(name: str):
    """A setting's default value."""
    return GenerationSettings.__dataclass_fields__[name].default


def recipe_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, dataclass field) of every setting a recipe keeps, in call order, for `Recipe`."""
    return [(f.name, meta(f.name).recipe_type, field(default=meta(f.name).recipe_default))
            for f in dataclasses.fields(GenerationSettings) if meta(f.name).recorded is not None]
