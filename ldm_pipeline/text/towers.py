"""SDXL's text: two CLIP towers read each prompt, and their contexts are joined on the feature axis.

- `text_encoder` (CLIP ViT-L, a `CLIPTextModel`) reads `prompt`; its penultimate hidden states are kept.
- `text_encoder_2` (OpenCLIP ViT-bigG, a `CLIPTextModelWithProjection`) reads `prompt_2` (default: `prompt`);
  its penultimate hidden states are kept, and its pooled projection conditions the UNet besides.
- The context is both towers' states side by side: (B, L, D1 + D2), 2048 features for SDXL. A refiner has
  only the second tower, so its context is that tower's states alone.

`clip_skip=N` keeps the hidden states N layers before the penultimate ones, on both sides of guidance
(diffusers applies it to the prompt only; a negative prompt's states are always its penultimate ones).
Long prompts are read in 75-token windows and `(word:1.3)` weights scale the states as for one tower
(`text.windows`); the pooled projection is the first window's and is not weighted.
An empty negative prompt is all zeros, context and pooled, when the model says `force_zeros_for_empty_prompt`
(SDXL base does): per row, so that an image depends only on its own prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import windows as windows_of
from .encode import EmbeddingCache, run_encoder, token_batch


@dataclass
class TowerText:
    """The joined context (B, L, D) and the second tower's pooled projection (B, P) of some prompts."""

    context: torch.Tensor
    pooled: torch.Tensor


@torch.no_grad()
def encode_tower(tokenizer, text_encoder, prompts: list[str], chunks: int, weighting: bool = False,
                 clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tower's penultimate hidden states (B, chunks * L, D) (`clip_skip` layers earlier) and, for a
    `CLIPTextModelWithProjection`, its pooled projection of each prompt's first window (B, P); else None."""
    tokens = token_batch(tokenizer, prompts, chunks, weighting)
    layer = -(2 + (clip_skip or 0))
    output = run_encoder(text_encoder, tokens, hidden_layer=layer)
    hidden = output.hidden_states[layer]
    hidden = hidden.reshape(len(prompts), -1, hidden.shape[-1])
    if weighting:
        hidden = windows_of.apply_weights(hidden, tokens["weights"])
    pooled = getattr(output, "text_embeds", None)
    if pooled is not None:
        pooled = pooled.reshape(len(prompts), chunks, -1)[:, 0]
    return hidden, pooled


def _tower_pair(tokenizer, text_encoder, prompts, chunks, weighting, clip_skip):
    # the cache keeps tensors, so a tower's (states, pooled) pair is one entry
    return encode_tower(tokenizer, text_encoder, prompts, chunks, weighting, clip_skip)


class TowerCaches:
    """One `EmbeddingCache` per tower, so that the two towers do not evict each other."""

    def __init__(self):
        self.first, self.second = EmbeddingCache(), EmbeddingCache()

    def clear(self) -> None:
        self.first.clear()
        self.second.clear()


def chunks_for(towers: list[tuple], texts: list[list[str]], weighting: bool) -> int:
    """Windows per prompt: as many as the longest text of any tower needs."""
    return max(windows_of.chunks_needed(tokenizer, side, weighting) for (tokenizer, _), side in zip(towers, texts)
               if side)


def encode_texts(towers: list[tuple], texts: list[list[str]], chunks: int, weighting: bool, clip_skip: int | None,
                 caches: list[EmbeddingCache] | None = None) -> TowerText:
    """Each tower `(tokenizer, text_encoder)` reads its own list of texts (one per row); the states are joined.

    Returns:
        `TowerText`: context (B, chunks * L, sum of the towers' widths), pooled (B, P) from the last tower.
    """
    states, pooled = [], None
    for i, ((tokenizer, encoder), side) in enumerate(zip(towers, texts)):
        if caches is not None:
            hidden, pooled_here = caches[i].encode(tokenizer, encoder, side, chunks, weighting, clip_skip,
                                                   encoder=_tower_pair)
        else:
            hidden, pooled_here = encode_tower(tokenizer, encoder, side, chunks, weighting, clip_skip)
        states.append(hidden)
        pooled = pooled_here if pooled_here is not None else pooled
    if pooled is None:
        raise ValueError("`text_encoder_2`: gives no pooled projection; SDXL's second tower must be a "
                         "transformers CLIPTextModelWithProjection")
    return TowerText(context=torch.cat(states, dim=-1), pooled=pooled)


def zero_rows(text: TowerText, rows: list[bool]) -> TowerText:
    """`text` with the chosen rows (an empty negative prompt, `force_zeros_for_empty_prompt`) all zeros."""
    if not any(rows):
        return text
    zero = torch.tensor(rows, device=text.context.device)
    return TowerText(context=torch.where(zero[:, None, None], 0.0, text.context).to(text.context.dtype),
                     pooled=torch.where(zero[:, None], 0.0, text.pooled).to(text.pooled.dtype))
