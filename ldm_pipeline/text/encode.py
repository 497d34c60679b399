"""Prompts -> CLIP text embeddings: tokenise, encode, negative prompts, images per prompt.

Long prompts and weighting are read into token windows by `text.windows`; this module encodes them.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from . import windows as windows_of
from ..provenance.hashes import weights_state


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


def text_states(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden state for each prompt, differentiable (training a text-encoder LoRA).

    Returns:
        (B, L, D) tensor on the text encoder's device and in its dtype.
    """
    tokens = tokenize(tokenizer, prompts)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens["attention_mask"].to(text_encoder.device)
    return text_encoder(tokens["input_ids"].to(text_encoder.device), attention_mask=mask)[0]


encode_text = torch.no_grad()(text_states)  # the same, without gradients: what the pipeline feeds the UNet


def token_batch(tokenizer, prompts: list[str], chunks: int, weighting: bool = False) -> dict[str, torch.Tensor]:
    """The tokens an encoder reads for `prompts` in `chunks` windows each: `input_ids` and `attention_mask`
    (B * chunks, L), and `weights` (B, chunks * L) or None. One window without weighting is the tokenizer's
    own output, token for token."""
    if chunks == 1 and not weighting:
        tokens = tokenize(tokenizer, prompts)
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "weights": None}
    tokens = windows_of.windows(tokenizer, prompts, chunks, weighting)
    return {"input_ids": tokens["input_ids"].flatten(0, 1), "attention_mask": tokens["attention_mask"].flatten(0, 1),
            "weights": tokens["weights"] if weighting else None}


def run_encoder(text_encoder, tokens: dict[str, torch.Tensor], hidden_layer: int | None = None):
    """The encoder's output for a `token_batch`; `hidden_states` only when `hidden_layer` (an index) is asked for."""
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens["attention_mask"].to(text_encoder.device)
    return text_encoder(tokens["input_ids"].to(text_encoder.device), attention_mask=mask,
                        output_hidden_states=hidden_layer is not None)


@torch.no_grad()
def encode_windows(tokenizer, text_encoder, prompts: list[str], chunks: int | None = None,
                   weighting: bool = False, clip_skip: int | None = None) -> torch.Tensor:
    """Embeddings of prompts of any length: `chunks` windows of the tokenizer's length each (see `text.windows`).

    Args:
        chunks: windows per prompt; None: as many as the longest prompt needs. With one window
            and no weighting this is `encode_text`, token for token.
        weighting: read the `(text:1.3)` syntax and scale the tokens' embeddings.
        clip_skip: read the hidden states this many layers before the last, through the final layer norm
            (diffusers' `clip_skip` for one-tower models); None or 0: the last layer's output.

    Returns:
        (B, chunks * L, D) tensor on the text encoder's device and in its dtype.
    """
    chunks = chunks or windows_of.chunks_needed(tokenizer, prompts, weighting)
    if chunks == 1 and not weighting and not clip_skip:
        return encode_text(tokenizer, text_encoder, prompts)
    tokens = token_batch(tokenizer, prompts, chunks, weighting)
    if clip_skip:
        output = run_encoder(text_encoder, tokens, hidden_layer=-(clip_skip + 1))
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 nests it
        hidden = final_norm(output.hidden_states[-(clip_skip + 1)])
    else:
        hidden = run_encoder(text_encoder, tokens)[0]
    hidden = hidden.reshape(len(prompts), -1, hidden.shape[-1])  # the chunks of a prompt, one after another
    return windows_of.apply_weights(hidden, tokens["weights"]) if weighting else hidden


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

    def clear(self) -> None:
        """Forget every entry (LoRA changes that no weight's fingerprint shows, such as a scale, call it)."""
        self._entries.clear()

    def encode(self, tokenizer, text_encoder, prompts: list[str], chunks: int | None = None,
               weighting: bool = False, clip_skip: int | None = None, encoder=None):
        """`encoder(tokenizer, text_encoder, prompts, chunks, weighting, clip_skip)` (default `encode_windows`),
        from the cache when seen before.

        The result may be the cached tensor itself: do not change it in place.
        """
        encoder = encoder or encode_windows
        owner = (id(tokenizer), id(text_encoder), weights_state(text_encoder))
        if owner != self._owner:
            self._entries.clear()
            self._owner = owner
        key = (encoder.__qualname__, tuple(prompts), chunks, weighting, clip_skip)
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            self._entries[key] = encoder(tokenizer, text_encoder, prompts, chunks, weighting, clip_skip)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return self._entries[key]


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str] | None,
    *,
    negative_prompts: list[str] | None = None,
    num_images_per_prompt: int = 1,
    guided: bool = True,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    cache: EmbeddingCache | None = None,
    weighting: bool = False,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditional and unconditional embeddings, one row per image to draw.

    Args:
        prompts: one string per prompt, or None when `prompt_embeds` (P, L, D) is given.
        negative_prompts: one per prompt, or None for the empty prompt.
        num_images_per_prompt: each prompt's row is repeated this many times, in place.
        guided: whether classifier-free guidance runs; without it no unconditional
            embeddings are computed and None is returned for them.
        cache: reuses the embeddings of prompts seen before (see `EmbeddingCache`).
        weighting: read the `(text:1.3)` syntax in prompts and negative prompts (see `text.windows`).
        clip_skip: read both sides this many layers before the last (see `encode_windows`).

    Prompts and negative prompts are encoded in as many windows as the longest of them needs,
    and at least as many as given embeddings hold, so that both sides have the same length.

    Returns:
        `(cond, uncond)`, each (P * num_images_per_prompt, L, D); `uncond` is None when not guided.
    """
    encode = cache.encode if cache is not None else encode_windows
    count = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    negatives = None
    if guided and negative_prompt_embeds is None:
        negatives = negative_prompts if negative_prompts is not None else [""] * count
    texts = (prompts or []) + (negatives or [])
    chunks = windows_of.chunks_needed(tokenizer, texts, weighting) if texts else 1
    given = [(name, e) for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds",
                                                                           negative_prompt_embeds if guided else None))
             if e is not None]
    for name, embeds in given if texts else []:
        length = tokenizer.model_max_length
        if embeds.shape[1] % length:
            raise ValueError(f"`{name}`: {embeds.shape[1]} tokens, not a multiple of the tokenizer's {length}, so "
                             f"the other side's text cannot be encoded to the same length; give both embeddings")
        chunks = max(chunks, embeds.shape[1] // length)
        texts_length = chunks * length
        if embeds.shape[1] != texts_length:
            raise ValueError(f"`{name}`: {embeds.shape[1]} tokens, but the other side's prompts need {texts_length}; "
                             "give both embeddings, or embeddings as long as the longest prompt")
    cond = prompt_embeds
    if cond is None:
        cond = encode(tokenizer, text_encoder, prompts, chunks, weighting, clip_skip)
    uncond = None
    if guided:
        uncond = negative_prompt_embeds if negatives is None else encode(tokenizer, text_encoder, negatives, chunks,
                                                                        weighting, clip_skip)
    dtype = text_encoder.dtype if text_encoder is not None else cond.dtype
    device = text_encoder.device if text_encoder is not None else cond.device

    def per_image(embeds: torch.Tensor) -> torch.Tensor:
        return embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

    return per_image(cond), (per_image(uncond) if uncond is not None else None)
