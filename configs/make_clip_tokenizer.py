"""Write OpenAI's CLIP BPE vocabulary as transformers' CLIPTokenizer files, gzip-compressed.

Stable Diffusion 1.x (CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14) share one BPE vocabulary,
which a single-file checkpoint does not carry. The open_clip_torch wheel on PyPI ships it as
`open_clip/bpe_simple_vocab_16e6.txt.gz`: a header line, then one merge per line. This script
turns it into `clip_tokenizer/vocab.json.gz` and `clip_tokenizer/merges.txt.gz`, which
`ldm_pipeline.single_file.bundled_clip_tokenizer` reads, so those checkpoints load offline.

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/wheel
    python configs/make_clip_tokenizer.py /tmp/wheel/open_clip_torch-3.3.0-py3-none-any.whl

The vocabulary (49,408 tokens) is laid out as CLIP's tokenizer lays it out: the 256 byte
symbols (printable bytes first, in byte order, then the others), the same 256 closing a word
("</w>"), one token per merge in merge order, then "<|startoftext|>" and "<|endoftext|>".
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

SOURCE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49408 - 512 - 2  # CLIP keeps the first 48,894 merges of the file
OUT = Path(__file__).parent / "clip_tokenizer"


def byte_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order: bytes that print as themselves, then stand-ins from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def convert(merges_text: str) -> tuple[dict[str, int], list[str]]:
    """(vocab, merge lines) from the text of the BPE file (header line first)."""
    merges = merges_text.split("\n")[1:1 + NUM_MERGES]
    assert len(merges) == NUM_MERGES and all(len(m.split()) == 2 for m in merges), "unexpected BPE file"
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges


def write_gzip(path: Path, text: str) -> None:
    # mtime=0 keeps the output byte-identical from run to run
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        merges_text = gzip.decompress(archive.read(SOURCE)).decode("utf-8")
    vocab, merges = convert(merges_text)
    OUT.mkdir(exist_ok=True)
    write_gzip(OUT / "vocab.json.gz", json.dumps(vocab, ensure_ascii=False) + "\n")
    write_gzip(OUT / "merges.txt.gz", "#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges into {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python configs/make_clip_tokenizer.py OPEN_CLIP_TORCH_WHEEL")
    main(sys.argv[1])
