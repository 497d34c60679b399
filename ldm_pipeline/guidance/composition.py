"""Composed prompts: `a red circle in the top left AND a blue square in the bottom right`.

The AND of composable diffusion (Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models", eq. 11), written as AUTOMATIC1111's web UI writes it. With
`prompt_composition=True` a prompt is cut at every `AND` (upper case, a word of its own); each part
may end in `:weight` (default 1). Each part is encoded on its own, the UNet sees every part in the
same batch as the negative prompt, and the guided prediction is

    uncond + scale * sum_i weight_i * (cond_i - uncond)

so each part pulls the image towards itself and the text encoder never has to bind a long prompt's
words to the right objects. One part of weight 1 is exactly classifier-free guidance. Prompts of
one call may have different numbers of parts: a prompt's missing parts are filled with its first
part at weight 0, which adds nothing. Parts are read before `(word:1.3)` weights (`text.windows`),
so a part may hold those too.

Regions (`regions=`, the area conditioning of ComfyUI's "Conditioning (Set Area)" and of the web
UI's regional-prompt extensions) give each part a box, (left, top, right, bottom) as fractions of
the image, or None for the whole image. A part then guides only the latent cells whose centres lie
in its box; cells in no part's box are shared by every part of the prompt at 1/parts each:

    uncond + scale * sum_i weight_i * mask_i * (cond_i - uncond)

Without regions each part pulls the whole image towards itself, and a part that names one object
also pulls the rest of the picture towards the empty background it was trained with; a part kept
to its own box does not.
"""

from __future__ import annotations

import math
import re

import torch

from .base import Guidance

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(.*?)\s*:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*$", re.DOTALL)


def split_prompt(prompt: str) -> list[tuple[str, float]]:
    """One prompt's (text, weight) parts.

    >>> split_prompt("a red circle AND a blue square :0.5")
    [('a red circle', 1.0), ('a blue square', 0.5)]

    A prompt without AND is one part of weight 1, its text unchanged.
    """
    pieces = _AND.split(prompt)
    if len(pieces) == 1:
        return [(prompt, 1.0)]
    parts = []
    for piece in pieces:
        match = _WEIGHT.match(piece)
        text, weight = (match.group(1), float(match.group(2))) if match else (piece, 1.0)
        parts.append((text.strip(), weight))
    return parts


def split_prompts(prompts: list[str]) -> tuple[list[list[str]], torch.Tensor]:
    """Prompts as slots: slot k holds each prompt's k-th part (its first part where it has fewer).

    Returns:
        `(slots, weights)`: K lists of P texts, K the most parts any prompt has, and the (K, P)
        weights, 0 for the filled-in parts.
    """
    split = [split_prompt(prompt) for prompt in prompts]
    count = max(len(parts) for parts in split)
    slots = [[parts[k][0] if k < len(parts) else parts[0][0] for parts in split] for k in range(count)]
    weights = torch.tensor([[parts[k][1] if k < len(parts) else 0.0 for parts in split] for k in range(count)],
                           dtype=torch.float32)
    return slots, weights


Box = tuple[float, float, float, float]


def _box(value, where: str) -> Box | None:
    if value is None:
        return None
    numbers = list(value) if isinstance(value, (list, tuple)) else None
    if (numbers is None or len(numbers) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)):
        raise ValueError(f"`regions`: {where} is {value!r}; expected (left, top, right, bottom) fractions of the "
                         "image, or None for the whole image")
    left, top, right, bottom = (float(v) for v in numbers)
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        raise ValueError(f"`regions`: {where} is {value!r}; expected 0 <= left < right <= 1 and "
                         "0 <= top < bottom <= 1")
    return left, top, right, bottom


def parse_box(text: str) -> Box | None:
    """`L,T,R,B` (fractions of the image) or `all` -> a box for `regions=` (None for `all`); the
    pipeline checks the values. Raises ValueError naming the text."""
    if text.strip().lower() == "all":
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"got {text!r}; expected L,T,R,B fractions such as 0,0,0.5,0.5, or 'all'") from None
    if len(box) != 4:
        raise ValueError(f"got {text!r}; expected four numbers L,T,R,B, or 'all'")
    return box


def parse_regions(text: str) -> list[Box | None] | None:
    """`L,T,R,B; L,T,R,B; all` -> a box per AND part (the web page's field); None for empty text."""
    if not text.strip():
        return None
    return [parse_box(part) for part in text.split(";")]


def check_regions(regions, prompt, prompts: list[str] | None, composed: bool) -> list[list[Box | None] | None] | None:
    """Refuse bad `regions` before any work; return them per prompt (None: that prompt has none).

    For a single prompt (a string), `regions` is one box per AND part; for a list of prompts, one
    such list (or None) per prompt.
    """
    if regions is None:
        return None
    if not composed:
        raise ValueError("`regions`: boxes belong to the parts of a composed prompt; pass prompt_composition=True")
    if not isinstance(regions, (list, tuple)):
        raise TypeError(f"`regions`: got {type(regions).__name__}; expected a list of boxes, one per AND part")
    per_prompt = [regions] if isinstance(prompt, str) else list(regions)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"`regions`: {len(per_prompt)} lists of boxes for {len(prompts)} prompts; expected one "
                         "per prompt (None for a prompt without regions)")
    checked = []
    for number, (boxes, text) in enumerate(zip(per_prompt, prompts)):
        if boxes is None:
            checked.append(None)
            continue
        parts = len(split_prompt(text))
        if not isinstance(boxes, (list, tuple)) or len(boxes) != parts:
            raise ValueError(f"`regions`: prompt {number} has {parts} part(s) but got {boxes!r}; expected one box "
                             "(or None) per part")
        checked.append([_box(box, f"prompt {number}, part {k}") for k, box in enumerate(boxes)])
    return checked


def region_weights(weights: torch.Tensor, regions: list[list[Box | None] | None], height: int,
                   width: int) -> torch.Tensor:
    """(K, P, 1, height, width): each slot's weight on each latent cell (see the module docstring).

    Args:
        weights: (K, P) from `split_prompts`.
        regions: per prompt, a box or None per part (or None for the prompt), from `check_regions`.
    """
    count, prompts = weights.shape
    masks = torch.ones(count, prompts, 1, height, width)
    rows = (torch.arange(height) + 0.5) / height
    cols = (torch.arange(width) + 0.5) / width
    for p, boxes in enumerate(regions):
        if boxes is None:
            continue
        for k, box in enumerate(boxes):
            if box is not None:
                left, top, right, bottom = box
                inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
                masks[k, p, 0] = inside.float()
        parts = len(boxes)
        uncovered = masks[:parts, p, 0].sum(dim=0) == 0
        masks[:parts, p, 0, uncovered] = 1.0 / parts
    return weights[:, :, None, None, None] * masks


def joined(slots: list[list[str] | None]) -> list[str] | None:
    """The slots' texts in one list, slot after slot (None for a call given embeddings, not prompts)."""
    return None if slots[0] is None else [text for slot in slots for text in slot]


def negatives_for(negatives: list[str] | None, prompts: list[str] | None, slots: int) -> list[str] | None:
    """The negative prompts to encode beside the slots' texts: one per prompt, not per part (the empty
    prompt's where none were given), as every part is guided against the same negative."""
    return [""] * len(prompts) if negatives is None and slots > 1 else negatives


def check_composition(value, prompts: list[str] | None) -> None:
    """Refuse a bad `prompt_composition` before any work."""
    if not isinstance(value, bool):
        raise TypeError(f"`prompt_composition`: got {value!r}; expected True or False")
    if value and prompts is None:
        raise ValueError("`prompt_composition`: composed prompts are read from `prompt`'s text; with only "
                         "`prompt_embeds` there is nothing to split at AND")


class Composed(Guidance):
    """Classifier-free guidance over several conditions at once (see the module docstring).

    Args:
        uncond: (B, L, D) the negative prompt's embeddings.
        others: the (B, L, D) embeddings of slots 1 ... K-1 (slot 0 is the loop's `cond`).
        weights: (K, B) each slot's weight per image, or (K, B, 1, h, w) per latent cell (`region_weights`).
        scale: the guidance scale.
    """

    def __init__(self, uncond: torch.Tensor, others: list[torch.Tensor], weights: torch.Tensor, scale: float):
        if tuple(weights.shape[:2]) != (len(others) + 1, uncond.shape[0]) or weights.dim() not in (2, 5):
            raise ValueError(f"`weights`: shape {tuple(weights.shape)}; expected ({len(others) + 1}, "
                             f"{uncond.shape[0]}) or ({len(others) + 1}, {uncond.shape[0]}, 1, h, w)")
        self.contexts, self.weights, self.scale = (uncond, *others), weights, scale

    def __call__(self, prediction, outputs, state):
        uncond = outputs[0]
        weights = self.weights.to(prediction.device, prediction.dtype)
        weights = weights[:, :, None, None, None] if weights.dim() == 2 else weights
        total = weights[0] * (prediction - uncond)
        for weight, output in zip(weights[1:], outputs[1:]):
            total = total + weight * (output - uncond)
        return uncond + self.scale * total
