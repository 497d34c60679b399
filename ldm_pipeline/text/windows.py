"""Prompts -> token windows: long prompts in 75-token chunks, and the opt-in `(word:1.3)` weighting syntax.

CLIP reads 77 tokens: a start token, 75 of the prompt, an end token. A longer prompt is split,
as AUTOMATIC1111's web UI splits it, into chunks of 75 tokens, each wrapped in start and end
tokens and padded to 77; the text encoder reads each chunk alone and the embeddings are
concatenated along the sequence, so the UNet's cross-attention sees (chunks * 77) tokens. All
prompts of a call, negative prompts included, get as many chunks as the longest needs (extra
chunks are empty ones: start, end, padding). A prompt that fits keeps its single window,
token for token what the tokenizer gives today. Unlike the web UI, chunks are cut at exactly
75 tokens (no moving back to a comma), and `BREAK` is ordinary text.

Weighting (`prompt_weighting=True`): `(text:1.3)` multiplies the embeddings of the tokens of
`text` by 1.3, `(text)` by 1.1, `[text]` divides by 1.1, groups nest and multiply, `\\(`, `\\)`,
`\\[`, `\\]` are literal brackets. After scaling, each prompt's embeddings are scaled back to
their original mean, as the web UI does, so a weight moves a token relative to the others.
"""

from __future__ import annotations

import math
import re

import torch

ROUND, SQUARE = 1.1, 1 / 1.1  # what ( ) and [ ] multiply by

# an escaped bracket or backslash | an opening bracket | ":number)" closing a group with a weight |
# a closing bracket | a run of plain text | a lone colon or backslash
_SYNTAX = re.compile(r"\\[()\[\]\\]|[(\[]|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|[)\]]|[^\\()\[\]:]+|[:\\]")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split weighted text into (fragment, weight) pairs, neighbours of equal weight merged.

    >>> parse_weights("a (red:1.5) circle, [blurry]")
    [('a ', 1.0), ('red', 1.5), (' circle, ', 1.0), ('blurry', 0.9090909090909091)]

    Unmatched closing brackets are text; an unclosed group weighs its text to the end.
    """
    fragments: list[list] = []  # [text, weight]
    open_round: list[int] = []  # where each open group's fragments start
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _SYNTAX.finditer(text):
        token = match.group(0)
        if len(token) == 2 and token[0] == "\\":
            fragments.append([token[1], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif match.group(1) is not None and open_round:
            scale(open_round.pop(), float(match.group(1)))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            fragments.append([token, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    merged: list[list] = []
    for fragment, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged]


def token_ids(tokenizer, prompt: str, weighting: bool = False) -> tuple[list[int], list[float]]:
    """The prompt's tokens without start and end tokens, and one weight per token (all 1 without weighting)."""
    pieces = parse_weights(prompt) if weighting else [(prompt, 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def window(tokenizer) -> int:
    """How many prompt tokens one chunk holds: the tokenizer's length less start and end (75 for CLIP)."""
    return tokenizer.model_max_length - 2


def chunks_needed(tokenizer, prompts: list[str], weighting: bool = False) -> int:
    """The number of chunks the longest of `prompts` needs (at least 1)."""
    size = window(tokenizer)
    return max([1] + [math.ceil(len(token_ids(tokenizer, p, weighting)[0]) / size) for p in prompts])


def windows(tokenizer, prompts: list[str], chunks: int, weighting: bool = False) -> dict[str, torch.Tensor]:
    """Token windows for `prompts`, each prompt in `chunks` chunks of `model_max_length` tokens.

    Returns:
        `input_ids` and `attention_mask`, each (B, chunks, L); `weights` (B, chunks * L), 1 at
        start, end and padding tokens.
    """
    length, size = tokenizer.model_max_length, window(tokenizer)
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    all_ids, all_masks, all_weights = [], [], []
    for prompt in prompts:
        ids, weights = token_ids(tokenizer, prompt, weighting)
        if len(ids) > chunks * size:
            raise ValueError(f"prompt {prompt[:40]!r}... needs {math.ceil(len(ids) / size)} chunks; {chunks} allowed")
        for chunk in range(chunks):
            part = ids[chunk * size:(chunk + 1) * size]
            part_weights = weights[chunk * size:(chunk + 1) * size]
            filler = length - 2 - len(part)
            all_ids.append([start, *part, end] + [pad] * filler)
            all_masks.append([1] * (len(part) + 2) + [0] * filler)
            all_weights.append([1.0, *part_weights, 1.0] + [1.0] * filler)
    shape = (len(prompts), chunks, length)
    return {"input_ids": torch.tensor(all_ids).reshape(shape), "attention_mask": torch.tensor(all_masks).reshape(shape),
            "weights": torch.tensor(all_weights).reshape(len(prompts), chunks * length)}


def apply_weights(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore each prompt's mean (the web UI's way).

    A prompt whose embeddings average to about zero (under a thousandth of their mean magnitude, as a
    text encoder whose last layer norm has no bias gives) keeps the plain scaling: its mean is rounding
    noise, and dividing by it would blow the embeddings up or flip their sign.

    Args:
        embeddings: (B, T, D); weights: (B, T).
    """
    if bool((weights == 1).all()):
        return embeddings
    original = embeddings.float().mean(dim=(1, 2), keepdim=True)
    scaled = embeddings.float() * weights.to(embeddings.device, torch.float32)[:, :, None]
    mean = scaled.mean(dim=(1, 2), keepdim=True)
    meaningful = mean.abs() > 1e-3 * scaled.abs().mean(dim=(1, 2), keepdim=True)
    factor = torch.where(meaningful, original / torch.where(meaningful, mean, torch.ones_like(mean)), 1.0)
    return (scaled * factor).to(embeddings.dtype)
