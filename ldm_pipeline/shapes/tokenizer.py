"""A CLIP-compatible byte-level BPE vocabulary learned from captions.

The files written (vocab.json, merges.txt) are the ones transformers' `CLIPTokenizer` loads:
256 byte symbols, the same 256 closing a word ("</w>"), one token per merge in the order it
was learned, then the start and end tokens. Training is the classic greedy loop of Sennrich
et al. 2016: merge the most frequent adjacent pair until the vocabulary is full.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

START, END = "<|startoftext|>", "<|endoftext|>"
WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_symbols() -> dict[int, str]:
    """A printable character for each byte, so that BPE symbols are never whitespace or control codes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, spare = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + spare)
            spare += 1
    return table


def _words(texts: list[str]) -> Counter:
    symbols = byte_symbols()
    counts = Counter()
    for text in texts:
        for word in WORD.findall(" ".join(text.lower().split())):
            chars = [symbols[b] for b in word.encode("utf-8")]
            counts[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    return counts


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def train_bpe(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn merges from `texts` until the vocabulary has `vocab_size` tokens (or nothing is left to merge).

    Returns:
        `(vocab, merges)`: token -> id, and the merges in the order learned.
    """
    base = list(byte_symbols().values())
    floor = 2 * len(base) + 2
    if vocab_size < floor:
        raise ValueError(f"`vocab_size`: got {vocab_size}; a byte-level CLIP vocabulary needs at least {floor}")
    words = _words(texts)
    if not words:
        raise ValueError("`texts`: no words to learn a vocabulary from")
    merges: list[tuple[str, str]] = []
    while floor + len(merges) < vocab_size:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    tokens = base + [symbol + "</w>" for symbol in base] + ["".join(pair) for pair in merges] + [START, END]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def save_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], directory: str | Path,
                        model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the settings CLIPTokenizer.from_pretrained(directory) reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    settings = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": START,
                "eos_token": END, "unk_token": END, "pad_token": END, "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return directory


def build_clip_tokenizer(texts: list[str], vocab_size: int, directory: str | Path, model_max_length: int = 77):
    """Learn a vocabulary from `texts`, save it in `directory` and return the loaded `CLIPTokenizer`."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(texts, vocab_size)
    save_clip_tokenizer(vocab, merges, directory, model_max_length)
    return CLIPTokenizer.from_pretrained(directory)
