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
part at weight 0, which adds nothing. Parts are read before `(word:1.3)` weights (`prompts.py`),
so a part may hold those too.
"""

from __future__ import annotations

import re

import torch

from .sampling import Guidance

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
        weights: (K, B) each slot's weight per image.
        scale: the guidance scale.
    """

    def __init__(self, uncond: torch.Tensor, others: list[torch.Tensor], weights: torch.Tensor, scale: float):
        if weights.shape != (len(others) + 1, uncond.shape[0]):
            raise ValueError(f"`weights`: shape {tuple(weights.shape)}; expected ({len(others) + 1}, {uncond.shape[0]})")
        self.contexts, self.weights, self.scale = (uncond, *others), weights, scale

    def recipe(self) -> dict:
        return {"prompt_composition": True}

    def __call__(self, prediction, outputs, state):
        uncond = outputs[0]
        weights = self.weights.to(prediction.device, prediction.dtype)[:, :, None, None, None]
        total = weights[0] * (prediction - uncond)
        for weight, output in zip(weights[1:], outputs[1:]):
            total = total + weight * (output - uncond)
        return uncond + self.scale * total
