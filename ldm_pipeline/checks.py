"""Argument checks for a pipeline call, run before any model does work.

Each error names the argument, the value received and what would be accepted.
"""

from __future__ import annotations

import numbers

import torch

from .images import OUTPUT_TYPES


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def prompts_of(prompt, prompt_embeds) -> list[str] | None:
    """The prompts as a list (None when embeddings are given), or a clear error."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("`prompt` and `prompt_embeds`: give exactly one of them, got "
                         + ("both" if prompt is not None else "neither"))
    if prompt is None:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
            raise ValueError(f"`prompt_embeds`: expected a (batch, tokens, dim) tensor, got "
                             f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}")
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


def check_size(height, width, multiple: int) -> None:
    """`height` and `width`: None, or positive multiples of the VAE factor."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not _is_int(value) or value <= 0 or value % multiple):
            raise ValueError(f"`{name}`: got {value!r}; expected a positive multiple of the VAE factor {multiple}")


def check_call(*, height, width, multiple, num_inference_steps, guidance_scale, num_images_per_prompt,
               strength, output_type, generator, seed, latents, batch: int, image_given: bool) -> None:
    """Check the numeric and choice arguments of a call; `batch` counts the images to draw."""
    check_size(height, width, multiple)
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps`: got {num_inference_steps!r}; expected an integer >= 1")
    if not isinstance(guidance_scale, numbers.Real) or guidance_scale < 0:
        raise ValueError(f"`guidance_scale`: got {guidance_scale!r}; expected a number >= 0 (<= 1 turns guidance off)")
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt`: got {num_images_per_prompt!r}; expected an integer >= 1")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type`: got {output_type!r}; expected one of {list(OUTPUT_TYPES)}")
    if image_given:
        if not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise ValueError(f"`strength`: got {strength!r}; expected a number in (0, 1]")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"`strength`: {strength} of {num_inference_steps} steps runs int({num_inference_steps} * {strength})"
                f" = 0 steps; raise strength or num_inference_steps so that at least one step runs"
            )
        if latents is not None:
            raise ValueError("`latents`: cannot be given together with `image`; image-to-image starts from the image")
    if generator is not None and seed is not None:
        raise ValueError("`generator` and `seed`: give at most one of them, got both")
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"`generator`: a list of {len(generator)} generators for {batch} images; "
                         "give one generator, or one per image")
    if seed is not None and not _is_int(seed) and not (isinstance(seed, list) and all(_is_int(s) for s in seed)):
        raise TypeError(f"`seed`: got {seed!r}; expected an integer or a list of integers")
    if isinstance(seed, list) and len(seed) != batch:
        raise ValueError(f"`seed`: a list of {len(seed)} seeds for {batch} images; give one seed, or one per image")
    if latents is not None and (not isinstance(latents, torch.Tensor) or latents.ndim != 4
                                or latents.shape[0] != batch):
        raise ValueError(f"`latents`: got {getattr(latents, 'shape', type(latents).__name__)}; "
                         f"expected a ({batch}, channels, height / {multiple}, width / {multiple}) tensor")
