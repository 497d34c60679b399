"""Prompts -> CLIP text embeddings: tokenise, encode, negative prompts, images per prompt."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from .fast import weights_state


def tokenize(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Pad every prompt to the tokenizer's length (77 for CLIP) and warn about what is cut off.

    Returns:
        The tokenizer's output: `input_ids` and `attention_mask`, each (B, L).
    """
    length = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    for prompt, ids in zip(prompts, tokenizer(prompts, padding=False, truncation=False)["input_ids"]):
        if len(ids) > length:
            dropped = tokenizer.decode(ids[length - 1 : -1])
            warnings.warn(f"prompt {prompt[:40]!r}... is longer than {length} tokens; dropped: {dropped!r}",
                          stacklevel=3)
    return tokens


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden state for each prompt.

    Returns:
        (B, L, D) tensor on the text encoder's device and in its dtype.
    """
    tokens = tokenize(tokenizer, prompts)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens["attention_mask"].to(text_encoder.device)
    return text_encoder(tokens["input_ids"].to(text_encoder.device), attention_mask=mask)[0]


class EmbeddingCache:
    """The embeddings of the last few prompt lists, reused while the text encoder is unchanged.

    A repeated prompt, and the empty negative prompt of every guided call, is encoded once.
    Entries are keyed by the whole list, because a batch is encoded together; they are dropped
    when the tokenizer or text encoder is another object, or a weight of it changed.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._owner = None

    def encode(self, tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
        """`encode_text(tokenizer, text_encoder, prompts)`, from the cache when seen before.

        The result may be the cached tensor itself: do not change it in place.
        """
        owner = (id(tokenizer), id(text_encoder), weights_state(text_encoder))
        if owner != self._owner:
            self._entries.clear()
            self._owner = owner
        key = tuple(prompts)
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            self._entries[key] = encode_text(tokenizer, text_encoder, prompts)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return self._entries[key]


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str] | None,
    negative_prompts: list[str] | None,
    num_images_per_prompt: int,
    guided: bool,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    cache: EmbeddingCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditional and unconditional embeddings, one row per image to draw.

    Args:
        prompts: one string per prompt, or None when `prompt_embeds` (P, L, D) is given.
        negative_prompts: one per prompt, or None for the empty prompt.
        num_images_per_prompt: each prompt's row is repeated this many times, in place.
        guided: whether classifier-free guidance runs; without it no unconditional
            embeddings are computed and None is returned for them.
        cache: reuses the embeddings of prompts seen before (see `EmbeddingCache`).

    Returns:
        `(cond, uncond)`, each (P * num_images_per_prompt, L, D); `uncond` is None when not guided.
    """
    encode = cache.encode if cache is not None else encode_text
    cond = prompt_embeds if prompt_embeds is not None else encode(tokenizer, text_encoder, prompts)
    uncond = None
    if guided:
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds
        else:
            negatives = negative_prompts if negative_prompts is not None else [""] * cond.shape[0]
            uncond = encode(tokenizer, text_encoder, negatives)
    dtype = text_encoder.dtype if text_encoder is not None else cond.dtype
    device = text_encoder.device if text_encoder is not None else cond.device

    def per_image(embeds: torch.Tensor) -> torch.Tensor:
        return embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

    return per_image(cond), (per_image(uncond) if uncond is not None else None)
