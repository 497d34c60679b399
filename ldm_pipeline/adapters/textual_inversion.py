"""Textual inversion (Gal et al. 2022): a new word whose token embedding was learned, the rest frozen.

Files in diffusers' format (`{token: (dim,) or (n, dim) tensor}`, what its training script saves) and
AUTOMATIC1111's (`string_to_param: {"*": (n, dim)}` with a `name`, or `emb_params` in a safetensors
file) are read; safetensors always, pickles only with `allow_pickle=True` (`torch.load(weights_only=True)`).
An embedding of n vectors becomes n tokens, `token token_1 ... token_{n-1}`, and prompts that name the
token are expanded to all of them before tokenising, as diffusers does, so that the pixels are
diffusers' `load_textual_inversion`'s. Negative embeddings ("EasyNegative" and the like) are loaded
the same way and named in the negative prompt.

Loading adds the tokens to the pipeline's tokenizer and rows to its text encoder's embedding table.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..loading.folders import is_hub_id
from .files import PICKLED, from_hub


def read_embedding(source, token: str | None, weight_name: str | None, allow_pickle: bool
                   ) -> tuple[str, torch.Tensor, str | None, str | None]:
    """(token, (n, dim) embedding, file, file SHA-256) of an embedding file, a folder, a Hub id or a state dict."""
    path = sha = None
    if isinstance(source, dict):
        state = source
    elif isinstance(source, (str, os.PathLike)):
        path = _file(source, weight_name)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        state = _read(path, data, allow_pickle)
    else:
        raise TypeError(f"`pretrained_model_name_or_path`: got {type(source).__name__}; expected an embedding file, "
                        "a folder, a Hub id or a state dict")
    found, embedding = _token_and_tensor(state, path)
    token = token or found
    if not token:
        raise ValueError("`token`: the file names no token; pass token=")
    if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2) or not embedding.is_floating_point():
        raise ValueError(f"`pretrained_model_name_or_path`: the embedding is not a (dim,) or (vectors, dim) float "
                         f"tensor (got {getattr(embedding, 'shape', type(embedding).__name__)})")
    return token, embedding.reshape(-1, embedding.shape[-1]), str(path.resolve()) if path else None, sha


def _file(source, weight_name: str | None) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        names = [weight_name] if weight_name else ["learned_embeds.safetensors", "learned_embeds.bin"]
        for name in names:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1 and not weight_name:
            return found[0]
        raise FileNotFoundError(f"`pretrained_model_name_or_path`: no embedding file in {str(path)!r}; pass "
                                "weight_name=")
    if is_hub_id(str(source)):
        return from_hub(str(source), weight_name or "learned_embeds.safetensors", "pretrained_model_name_or_path")
    raise FileNotFoundError(f"`pretrained_model_name_or_path`: {str(source)!r} is neither a file, a folder nor a "
                            "Hub id")


def _read(path: Path, data: bytes, allow_pickle: bool) -> dict:
    if path.suffix in PICKLED:
        if not allow_pickle:
            raise ValueError(f"`pretrained_model_name_or_path`: {str(path)!r} is a pickle, which can run code when "
                             "loaded; use its .safetensors version, or pass allow_pickle=True to read it with "
                             "torch.load(weights_only=True)")
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"`pretrained_model_name_or_path`: {str(path)!r} is not a readable safetensors file "
                         f"({error})") from None


def _token_and_tensor(state: dict, path: Path | None) -> tuple[str | None, torch.Tensor]:
    if "string_to_param" in state:  # A1111's .pt
        return state.get("name") or (path.stem if path else None), state["string_to_param"]["*"]
    if "emb_params" in state:  # A1111's .safetensors: the token is the file's name
        return (path.stem if path else None), state["emb_params"]
    if len(state) == 1:  # diffusers'
        return next(iter(state.items()))
    raise ValueError(f"`pretrained_model_name_or_path`: not a textual-inversion embedding (keys: "
                     f"{sorted(state)[:5]}); expected diffusers' {{token: tensor}} or A1111's string_to_param / "
                     "emb_params")


def tokens_for(token: str, vectors: int) -> list[str]:
    """The tokens of an embedding of `vectors` vectors: `token`, `token_1`, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def load(pipe, source, token: str | None = None, weight_name: str | None = None, allow_pickle: bool = False) -> str:
    """Add an embedding's tokens to the pipeline's tokenizer and text encoder; returns the token."""
    token, embedding, path, sha = read_embedding(source, token, weight_name, allow_pickle)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokens = tokens_for(token, embedding.shape[0])
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"`token`: {taken[0]!r} is already in the tokenizer's vocabulary; choose another token=")
    table = encoder.get_input_embeddings().weight
    if embedding.shape[-1] != table.shape[-1]:
        raise ValueError(f"`pretrained_model_name_or_path`: the embedding has {embedding.shape[-1]} features per "
                         f"vector; this text encoder takes {table.shape[-1]} (is it for another model?)")
    encoder.resize_token_embeddings(len(tokenizer) + len(tokens))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vector in zip(tokens, embedding):
            tokenizer.add_tokens(name)
            table[tokenizer.convert_tokens_to_ids(name)] = vector.to(table.device, table.dtype)
    pipe.embeddings[token] = dict(token=token, vectors=len(tokens), path=path, sha256=sha)
    pipe.embedding_cache.clear()
    return token


def expand(prompt: str, tokenizer) -> str:
    """The prompt with each multi-vector token written out as all of its tokens (diffusers' expansion)."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            extra, i = [], 1
            while f"{token}_{i}" in added:
                extra.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join([token, *extra]))
    return prompt


def recipe_of(pipe) -> dict:
    """The `Recipe` field for the loaded embeddings (none: {})."""
    return {"embeddings": list(pipe.embeddings.values())} if pipe.embeddings else {}


class TextualInversionMethods:
    """`load_textual_inversion` for the pipeline class (diffusers' name and arguments)."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | None = None,
                               weight_name: str | None = None, allow_pickle: bool = False):
        """Load a textual-inversion embedding (diffusers' or A1111's file; safetensors, or a pickle with
        `allow_pickle`) as `token` (default: the file's own). Returns self."""
        load(self, pretrained_model_name_or_path, token, weight_name, allow_pickle)
        return self
