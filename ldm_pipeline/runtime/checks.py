"""Argument checks for a pipeline call, run before any model does work.

Each error names the argument, the value received and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from ..images import OUTPUT_TYPES


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes without folding negative seeds onto others


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_number(name: str, value, accepted: str) -> float:
    """A finite real number, or a TypeError (not a number) / ValueError (NaN, infinity) naming `name`."""
    if not _is_number(value):
        raise TypeError(f"`{name}`: got {value!r}; expected {accepted}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}`: got {value!r}; expected a finite number, {accepted}")
    return float(value)


def check_tensor(name: str, value, ndim: int, expected: str) -> torch.Tensor:
    """A floating-point tensor of `ndim` dimensions, none empty, holding only finite values."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}`: got {type(value).__name__}; expected {expected}")
    if value.ndim != ndim or 0 in value.shape:
        raise ValueError(f"`{name}`: got shape {tuple(value.shape)}; expected {expected}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}`: got dtype {value.dtype}; expected a floating-point tensor")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}`: holds NaN or infinity; expected finite values")
    return value


def prompts_of(prompt, prompt_embeds) -> list[str] | None:
    """The prompts as a list (None when embeddings are given), or a clear error."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("`prompt` and `prompt_embeds`: give exactly one of them, got "
                         + ("both" if prompt is not None else "neither"))
    if prompt is None:
        check_tensor("prompt_embeds", prompt_embeds, 3, "a (batch, tokens, dim) tensor")
        return None
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"`prompt`: got {prompt!r}; expected a string or a non-empty list of strings")
    return prompts


def negatives_of(negative_prompt, batch: int, negative_prompt_embeds, prompt_embeds) -> list[str] | None:
    """One negative prompt per prompt, or None for the empty prompt."""
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("`negative_prompt` and `negative_prompt_embeds`: give at most one of them, got both")
    if negative_prompt_embeds is not None:
        check_tensor("negative_prompt_embeds", negative_prompt_embeds, 3, "a (batch, tokens, dim) tensor")
        if negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"`negative_prompt_embeds`: {negative_prompt_embeds.shape[0]} rows for {batch} prompts; "
                             "give one per prompt")
        reference = prompt_embeds.shape if prompt_embeds is not None else None
        if reference is not None and negative_prompt_embeds.shape != reference:
            raise ValueError(f"`negative_prompt_embeds`: shape {tuple(negative_prompt_embeds.shape)} differs from "
                             f"`prompt_embeds` {tuple(reference)}; they must match")
        return None
    if negative_prompt is None:
        return None
    negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise TypeError(f"`negative_prompt`: got {negative_prompt!r}; expected a string or a list of strings")
    if len(negatives) != batch:
        raise ValueError(f"`negative_prompt`: {len(negatives)} negative prompts for {batch} prompts; "
                         "give one string, or one per prompt")
    return negatives


def batch_of(num_prompts: int, num_images_per_prompt) -> int:
    """How many images a call draws, after checking `num_images_per_prompt`."""
    check_images_per_prompt(num_images_per_prompt)
    return num_prompts * int(num_images_per_prompt)


def check_size(height, width, multiple: int) -> None:
    """`height` and `width`: None, or positive multiples of the VAE factor."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not is_int(value) or value <= 0 or value % multiple):
            raise ValueError(f"`{name}`: got {value!r}; expected a positive multiple of the VAE factor {multiple}")


def check_seed(seed, batch: int) -> None:
    """`seed`: None, an integer or one integer per image, each within what a torch generator takes."""
    if seed is None:
        return
    if not is_int(seed) and not (isinstance(seed, list) and all(is_int(s) for s in seed)):
        raise TypeError(f"`seed`: got {seed!r}; expected an integer or a list of integers")
    if isinstance(seed, list) and len(seed) != batch:
        raise ValueError(f"`seed`: a list of {len(seed)} seeds for {batch} images; give one seed, or one per image")
    low, high = SEED_RANGE
    # seed=S draws image i from S + i, so the last image's seed must fit too
    seeds = seed if isinstance(seed, list) else [seed, seed + batch - 1]
    bad = next((s for s in seeds if not low <= s <= high), None)
    if bad is not None:
        raise ValueError(f"`seed`: got {seed!r}{'' if bad == seed else f' (image seed {bad})'}; expected integers in "
                         f"[0, 2**64 - 1] (seed=S draws image i from S + i); seed=None draws a random one")


def check_steps(num_inference_steps) -> None:
    if not is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps`: got {num_inference_steps!r}; expected an integer >= 1")


def check_guidance(guidance_scale) -> None:
    guidance = finite_number("guidance_scale", guidance_scale, "a number >= 0 (<= 1 turns guidance off)")
    if guidance < 0:
        raise ValueError(f"`guidance_scale`: got {guidance_scale!r}; expected a number >= 0 (<= 1 turns guidance off)")


def check_eta(eta) -> None:
    eta_value = finite_number("eta", eta, "a number in [0, 1] (DDIM's noise share)")
    if not 0 <= eta_value <= 1:
        raise ValueError(f"`eta`: got {eta!r}; expected a number in [0, 1] (DDIM's noise share)")


def check_images_per_prompt(num_images_per_prompt) -> None:
    if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt`: got {num_images_per_prompt!r}; expected an integer >= 1")


def check_output_type(output_type) -> None:
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type`: got {output_type!r}; expected one of {list(OUTPUT_TYPES)}")


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback`: got {type(callback).__name__}; expected a function (step, timestep, latents)")


def check_strength(strength) -> None:
    strength_value = finite_number("strength", strength, "a number in (0, 1]")
    if not 0 < strength_value <= 1:
        raise ValueError(f"`strength`: got {strength!r}; expected a number in (0, 1]")


def check_call(settings, *, batch: int, multiple: int, latent_channels: int | None = None,
               max_steps: int | None = None, context_dim: int | None = None) -> None:
    """Check a call's `GenerationSettings` (defaults filled in): each setting's own check, then those
    that involve several; `batch` counts the images to draw.

    `multiple` is the VAE factor; `latent_channels`, `context_dim` and `max_steps` are the UNet's
    latent channels, its cross-attention width and the scheduler's training timesteps.
    """
    s = settings
    check_size(s.height, s.width, multiple)
    for f in dataclasses.fields(s):
        own = f.metadata["setting"].check
        if own is not None:
            own(getattr(s, f.name))
    if max_steps is not None and s.num_inference_steps > max_steps:
        raise ValueError(f"`num_inference_steps`: got {s.num_inference_steps}; expected at most {max_steps}, the "
                         "scheduler's training timesteps (a distilled schedule's length for lcm and tcd)")
    if s.image is not None:
        if int(s.num_inference_steps * s.strength) < 1:
            raise ValueError(
                f"`strength`: {s.strength} of {s.num_inference_steps} steps runs int({s.num_inference_steps} * "
                f"{s.strength}) = 0 steps; raise strength or num_inference_steps so that at least one step runs"
            )
        if s.latents is not None:
            raise ValueError("`latents`: cannot be given together with `image`; image-to-image starts from the image")
    generator = s.generator
    if generator is not None and s.seed is not None:
        raise ValueError("`generator` and `seed`: give at most one of them, got both")
    if generator is not None and not isinstance(generator, torch.Generator) and not (
            isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator)):
        raise TypeError(f"`generator`: got {generator!r}; expected a torch.Generator or a list of them")
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"`generator`: a list of {len(generator)} generators for {batch} images; "
                         "give one generator, or one per image")
    check_seed(s.seed, batch)
    if s.latents is not None:
        check_latents(s.latents, batch, multiple, latent_channels, s.height, s.width)
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        value = getattr(s, name)
        if value is not None and context_dim is not None and value.shape[-1] != context_dim:
            raise ValueError(f"`{name}`: got shape {tuple(value.shape)}; the UNet's cross-attention takes "
                             f"{context_dim} features per token")


def check_latents(latents, batch: int, multiple: int, channels: int | None, height, width) -> None:
    """`latents`: a finite (batch, channels, height / f, width / f) tensor."""
    expected = f"a ({batch}, {channels or 'channels'}, height / {multiple}, width / {multiple}) tensor"
    if isinstance(latents, torch.Tensor) and (latents.ndim != 4 or latents.shape[0] != batch):
        raise ValueError(f"`latents`: got {latents.shape}; expected {expected}")
    check_tensor("latents", latents, 4, expected)
    if channels is not None and latents.shape[1] != channels:
        raise ValueError(f"`latents`: got {latents.shape[1]} channels (shape {tuple(latents.shape)}); the UNet takes "
                         f"{channels}")
    for name, value, side in (("height", height, latents.shape[2]), ("width", width, latents.shape[3])):
        if value is not None and value != side * multiple:
            raise ValueError(f"`latents`: shape {tuple(latents.shape)} is for {name} {side * multiple}, but `{name}` "
                             f"is {value}; leave `{name}` out or make them agree")


def output_size(height, width, multiple: int, sample_size: int, latents: torch.Tensor | None,
                reference_size: tuple[int, int] | None) -> tuple[int, int]:
    """The (height, width) a call draws at: given latents' size, else an image-to-image reference's
    (`images.image_size`), else `height`/`width`, else the UNet's sample size times the VAE factor."""
    if reference_size is not None:
        height, width = reference_size
    if latents is not None:
        height, width = latent_size(latents, multiple)
    return height or sample_size * multiple, width or sample_size * multiple


def latent_size(latents: torch.Tensor | None, multiple: int) -> tuple[int | None, int | None]:
    """The (height, width) in pixels that given latents stand for, or (None, None)."""
    if latents is None:
        return None, None
    return latents.shape[2] * multiple, latents.shape[3] * multiple


def check_slice_size(slice_size) -> None:
    """Attention slicing: "auto", "max" or a positive number of heads per slice."""
    if not (slice_size in ("auto", "max") or (is_int(slice_size) and slice_size >= 1)):
        raise ValueError(f"`slice_size`: got {slice_size!r}; expected \"auto\", \"max\" or an integer >= 1 "
                         "(attention heads per slice)")


def check_tile_size(tile_size, multiple: int) -> None:
    """VAE tiling: None (the VAE's own) or a tile side in pixels, a multiple of the VAE's factor, at least 4 latents."""
    if tile_size is not None and not (is_int(tile_size) and tile_size >= 4 * multiple and tile_size % multiple == 0):
        raise ValueError(f"`tile_size`: got {tile_size!r}; expected None or an integer multiple of {multiple} "
                         f"of at least {4 * multiple} (pixels)")


def check_offload_device(device) -> torch.device:
    """Model offload's execution device: where the models run (None: the GPU; "cpu" only shows the hooks at work)."""
    if device is None:
        if not torch.cuda.is_available():
            raise ValueError("`device`: model offload moves each model to a GPU while it runs, and no GPU was found; "
                             "pass device= (e.g. \"cuda:1\", or \"cpu\" to try it out)")
        device = "cuda"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device`: got {device!r}; expected a device such as \"cuda\" or \"cuda:1\"") from error
    return device
