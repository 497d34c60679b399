"""Textual inversion (Gal et al. 2022): a new word whose token embedding was learned, the rest frozen.

Files in diffusers' format (`{token: (dim,) or (n, dim) tensor}`, what its training script saves) and
AUTOMATIC1111's (`string_to_param: {"*": (n, dim)}` with a `name`, or `emb_params` in a safetensors
file) are read; safetensors always, pickles only with `allow_pickle=True` (`torch.load(weights_only=True)`).
An embedding of n vectors becomes n tokens, `token token_1 ... token_{n-1}`, and prompts that name the
token are expanded to all of them before tokenising, as diffusers does, so that the pixels are
diffusers' `load_textual_inversion`'s. Negative embeddings ("EasyNegative" and the like) are loaded
the same way and named in the negative prompt.

Loading adds the tokens to the pipeline's tokenizer and rows to its text encoder's embedding table.
SDXL files hold a set of vectors per tower (`clip_l` for `text_encoder`, `clip_g` for `text_encoder_2`):
each tower takes its own, and expands prompts with its own tokenizer. diffusers' `text_encoder=` /
`tokenizer=` put one set on the tower they name (diffusers loads an SDXL pair so, one call per tower).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..loading.folders import is_hub_id
from .files import PICKLED, from_hub


SDXL_SETS = ("clip_l", "clip_g")  # an SDXL file's vectors: the first tower's (CLIP ViT-L), the second's (bigG)
TOWER_SETS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # which set each text encoder takes


def read_embedding(source, token: str | None, weight_name: str | None, allow_pickle: bool
                   ) -> tuple[str, dict[str, torch.Tensor], str | None, str | None]:
    """(token, vectors, file, file SHA-256) of an embedding file, a folder, a Hub id, a state dict or a tensor.

    vectors: {"clip_l": (n, 768), "clip_g": (n, 1280)} for an SDXL file; {"": (n, dim)} for one set."""
    path = sha = None
    if isinstance(source, torch.Tensor):  # one tower's vectors, as diffusers takes them (token= names it)
        state = {"": source}
    elif isinstance(source, dict):
        state = source
    elif isinstance(source, (str, os.PathLike)):
        path = _file(source, weight_name)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        state = _read(path, data, allow_pickle)
    else:
        raise TypeError(f"`pretrained_model_name_or_path`: got {type(source).__name__}; expected an embedding file, "
                        "a folder, a Hub id, a state dict or a tensor")
    if set(state) == set(SDXL_SETS):
        found, sets = (path.stem if path else None), {name: state[name] for name in SDXL_SETS}
    else:
        found, embedding = _token_and_tensor(state, path)
        sets = {"": embedding}
    token = token or found
    if not token:
        raise ValueError("`token`: the file names no token; pass token=")
    return token, {name: _vectors(embedding) for name, embedding in sets.items()}, \
        str(path.resolve()) if path else None, sha


def _vectors(embedding) -> torch.Tensor:
    if not isinstance(embedding, torch.Tensor) or embedding.ndim not in (1, 2) or not embedding.is_floating_point():
        raise ValueError(f"`pretrained_model_name_or_path`: the embedding is not a (dim,) or (vectors, dim) float "
                         f"tensor (got {getattr(embedding, 'shape', type(embedding).__name__)})")
    return embedding.reshape(-1, embedding.shape[-1])


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


def _towers(pipe) -> dict[str, tuple]:
    """Each text tower by its encoder's component name ("text_encoder", "text_encoder_2"): (tokenizer, encoder)."""
    return {name: (getattr(pipe, name.replace("text_encoder", "tokenizer")), model)
            for name, model in pipe.named_models if name.startswith("text_encoder")}


def _chosen_tower(pipe, tokenizer, text_encoder) -> str | None:
    """The tower that `tokenizer` and/or `text_encoder` (diffusers' arguments) are part of; None for neither."""
    towers, chosen = _towers(pipe), None
    for argument, given, part in (("tokenizer", tokenizer, 0), ("text_encoder", text_encoder, 1)):
        if given is None:
            continue
        names = [name for name, pair in towers.items() if pair[part] is given]
        if not names:
            accepted = ", ".join(f"pipe.{name.replace('text_encoder', argument)}" for name in towers)
            raise ValueError(f"`{argument}`: got a {type(given).__name__} that is not this pipeline's; pass "
                             f"{accepted}, or leave it out")
        if chosen not in (None, names[0]):
            raise ValueError(f"`text_encoder`: is pipe.{names[0]}, and `tokenizer` is {chosen}'s; pass one "
                             "tower's pair")
        chosen = names[0]
    return chosen


def _placements(pipe, sets: dict[str, torch.Tensor], tower: str | None) -> list[tuple[str, torch.Tensor]]:
    """Which tower takes which vectors: an SDXL file's clip_l and clip_g go to their towers (a chosen tower
    takes its own); one set goes to the chosen tower, or to the model's only one."""
    names = [tower] if tower else list(_towers(pipe))
    if "" in sets:
        if len(names) > 1:
            shapes = ", ".join(f"pipe.{n} ({_towers(pipe)[n][1].get_input_embeddings().weight.shape[-1]} wide)"
                               for n in names)
            raise ValueError(f"`text_encoder`: got none, with an embedding of one set of vectors "
                             f"({tuple(sets[''].shape)}) for a model with two text encoders; say which tower takes it "
                             f"with text_encoder= and tokenizer= ({shapes}), or load an SDXL file holding clip_l "
                             "and clip_g")
        return [(names[0], sets[""])]
    if pipe.added_layout is None and tower is None:
        raise ValueError("`pretrained_model_name_or_path`: an SDXL embedding (clip_l and clip_g, one set per tower) "
                         "for a model with one text encoder; load a one-set embedding ({token: tensor}), or pass "
                         "one set: load_textual_inversion(state['clip_l'], token=...)")
    return [(name, sets[TOWER_SETS[name]]) for name in names]


def _check_fits(tokenizer, encoder, tokens: list[str], vectors: torch.Tensor) -> None:
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"`token`: {taken[0]!r} is already in the tokenizer's vocabulary; choose another token=")
    width = encoder.get_input_embeddings().weight.shape[-1]
    if vectors.shape[-1] != width:
        raise ValueError(f"`pretrained_model_name_or_path`: the embedding has {vectors.shape[-1]} features per "
                         f"vector; this text encoder takes {width} (is it for another model?)")


def _add_tokens(tokenizer, encoder, tokens: list[str], vectors: torch.Tensor) -> None:
    """The tokens added to the tokenizer and their vectors as new rows of the encoder's embedding table."""
    encoder.resize_token_embeddings(len(tokenizer) + len(tokens))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vector in zip(tokens, vectors):
            tokenizer.add_tokens(name)
            table[tokenizer.convert_tokens_to_ids(name)] = vector.to(table.device, table.dtype)


def load(pipe, source, token: str | None = None, weight_name: str | None = None, allow_pickle: bool = False,
         tokenizer=None, text_encoder=None) -> str:
    """Add an embedding's tokens to the pipeline's tokenizers and text encoders; returns the token."""
    tower = _chosen_tower(pipe, tokenizer, text_encoder)
    token, sets, path, sha = read_embedding(source, token, weight_name, allow_pickle)
    placements, towers = _placements(pipe, sets, tower), _towers(pipe)
    for name, vectors in placements:  # every check before any change
        _check_fits(*towers[name], tokens_for(token, vectors.shape[0]), vectors)
    for name, vectors in placements:
        _add_tokens(*towers[name], tokens_for(token, vectors.shape[0]), vectors)
    earlier = pipe.embeddings.get(token, {}).get("towers", [])  # diffusers' way: one call per tower
    pipe.embeddings[token] = dict(token=token, vectors=placements[0][1].shape[0], path=path, sha256=sha,
                                  towers=[*earlier, *(name for name, _ in placements)])
    pipe.clear_embedding_caches()
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


def expand_sides(towers: list[tuple], sides: list[list[str]]) -> list[list[str]]:
    """Each tower's texts with its multi-vector tokens written out by its own tokenizer (towers may differ in
    the tokens they were given)."""
    return [[expand(text, tokenizer) for text in side] for (tokenizer, _), side in zip(towers, sides)]


def recipe_of(pipe) -> dict:
    """The `Recipe` field for the loaded embeddings (none: {})."""
    return {"embeddings": list(pipe.embeddings.values())} if pipe.embeddings else {}


class TextualInversionMethods:
    """`load_textual_inversion` for the pipeline class (diffusers' name and arguments)."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | None = None,
                               weight_name: str | None = None, allow_pickle: bool = False, tokenizer=None,
                               text_encoder=None):
        """Load a textual-inversion embedding (diffusers' or A1111's file; safetensors, or a pickle with
        `allow_pickle`; a state dict or one tensor) as `token` (default: the file's own). Returns self.

        An SDXL file holds a set of vectors per tower (`clip_l`, `clip_g`): each tower takes its own (a
        refiner the `clip_g`). `text_encoder` and `tokenizer` (diffusers' arguments, e.g. `pipe.text_encoder_2`
        and `pipe.tokenizer_2`) say which tower takes an embedding; an SDXL model needs them for a file of
        one set."""
        load(self, pretrained_model_name_or_path, token, weight_name, allow_pickle, tokenizer, text_encoder)
        return self
