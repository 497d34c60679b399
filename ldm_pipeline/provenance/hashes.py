"""Telling weights apart, and which model drew an image.

Two questions come up again and again: "did these weights change since I last looked?" (asked
before every call, so it must cost microseconds: `weights_state`) and "are these the same weights
as those?" across processes and machines (a cache key, a recipe's model hash: `hash_state`).

Which model drew an image (`ModelIdentity`): its name and a hash that changes when its weights change.
The hash: for a pipeline loaded with `from_single_file`, the SHA-256 of that file (A1111's model
hash, shown as its first 10 hex digits) while the weights are exactly those loaded; otherwise a
digest of the weights' values (text encoder, VAE and UNet state dicts). Floating-point weights
are hashed as the fp32 numbers they equal, so moving the model to another device, or casting
fp16/bf16 weights up, keeps the hash; changing, replacing or rounding a weight changes it.
Hashes are cached per weights fingerprint, so repeated saves hash once (about 0.04 s for the
bundled model; seconds for Stable Diffusion 1.5).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .infotext import HASH_SHOWN


def module_tensors(module: torch.nn.Module):
    """Every parameter and buffer of the module and its children, in order (a shared one once per owner).

    Walks the modules once; `parameters()` and `buffers()` walk twice and de-duplicate (3 ms
    against 1.3 ms on the bundled UNet, and it runs before every call).
    """
    for child in module.modules():
        for tensor in (*child._parameters.values(), *child._buffers.values()):
            if tensor is not None:
                yield tensor


def weights_state(module: torch.nn.Module) -> tuple:
    """A cheap fingerprint that changes when a weight is replaced, moved, cast or changed in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in module_tensors(module))


def hash_state(digest, state: dict[str, torch.Tensor], prefix: str = "", as_fp32: bool = True) -> None:
    """Feed a state dict to a hashlib `digest`: each tensor's name, shape and bytes, in name order.

    Args:
        prefix: put before every name (to hash several models into one digest).
        as_fp32: hash floating-point values as the fp32 numbers they equal (fp16 and bf16 convert exactly),
            so casting up or moving the model keeps the digest; False hashes the stored bytes and the dtype
            (what a compiled artefact with the weights baked in depends on).
    """
    for name, tensor in sorted(state.items()):
        value = tensor.detach().to("cpu")
        if as_fp32:
            value = value.float() if value.is_floating_point() else value
            digest.update(f"{prefix}{name}:{tuple(value.shape)};".encode())
        else:
            digest.update(f"{prefix}{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy())


def _models(pipe) -> list[tuple[str, torch.nn.Module]]:
    return pipe.named_models  # text encoder(s), VAE, UNet


def _base_tensors(model: torch.nn.Module):
    """The model's own tensors: LoRA adapters' layers (peft's `lora_A`, `lora_B`, ...) left out."""
    if not getattr(model, "peft_config", None):
        yield from module_tensors(model)
        return
    for name, child in model.named_modules():
        if ".lora_" not in f".{name}":
            yield from (t for t in (*child._parameters.values(), *child._buffers.values()) if t is not None)


def fingerprint(pipe) -> tuple:
    """A cheap key that changes when a weight is changed in place, replaced or cast (not when moved).

    Unfused LoRA adapters are not part of the model (recipes list them apart); fusing one changes
    the weights, and so the key."""
    return tuple((id(t), t._version, t.dtype) for _, model in _models(pipe) for t in _base_tensors(model))


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without LoRA tensors, under the names the layers have without peft's wrapping."""
    state = model.state_dict()
    if not getattr(model, "peft_config", None):
        return state
    return {name.replace(".base_layer.", "."): tensor for name, tensor in state.items()
            if ".lora_" not in f".{name}"}


def weights_digest(pipe) -> str:
    """A digest (32 hex) of the text encoder's, VAE's and UNet's state dicts: names, shapes and values
    (LoRA adapters left out: see `fingerprint`).

    Floating-point tensors are hashed as fp32, which holds fp16 and bf16 values exactly, so the
    digest does not depend on the device or on casting up.
    """
    digest = hashlib.blake2b(digest_size=16)
    for label, model in _models(pipe):
        hash_state(digest, _base_state(model), prefix=f"{label}.")
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class ModelIdentity:
    """A pipeline's model name and hash; hashes are cached per weights fingerprint.

    Args:
        name: the model's name for recipes (a folder name, Hub id or file name).
    """

    def __init__(self, name: str | None = None):
        self.name = name
        self._file: tuple | None = None  # (path, size, mtime_ns, fingerprint) of a single-file load
        self._file_hash: str | None = None
        self._digests: dict[tuple, str] = {}

    def loaded_from_file(self, path: str | os.PathLike, pipe) -> None:
        """Remember the single file the weights came from, so the hash is the file's SHA-256."""
        stat = Path(path).stat()
        self._file = (str(path), stat.st_size, stat.st_mtime_ns, fingerprint(pipe))
        self.name = Path(path).stem

    def hash(self, pipe, key: tuple | None = None) -> str:
        """The model hash for the weights with fingerprint `key` (default: the pipeline's now).

        Raises a ValueError when `key` is neither the present weights nor ones hashed before.
        """
        if key is not None and key in self._digests and (self._file is None or key != self._file[3]):
            return self._digests[key]  # known weights: no walk over every tensor (3 ms on the bundled model)
        now = fingerprint(pipe)
        key = now if key is None else key
        if self._file is not None and key == self._file[3]:
            path, size, mtime, _ = self._file
            stat = Path(path).stat() if Path(path).is_file() else None
            if self._file_hash is None and stat and (stat.st_size, stat.st_mtime_ns) == (size, mtime):
                self._file_hash = file_sha256(path)
            if self._file_hash is not None:
                return self._file_hash
        if key not in self._digests:
            if key != now:
                raise ValueError("the pipeline's weights changed after these images were drawn, so their model "
                                 "hash is unknown; save the images before changing the weights")
            if len(self._digests) >= 4:
                self._digests.pop(next(iter(self._digests)))
            self._digests[key] = weights_digest(pipe)
        return self._digests[key]


def same_model(recorded: str, present: str) -> bool:
    """Hashes agree on their common prefix, at least 10 hex digits (an A1111 line shows 10)."""
    length = min(len(recorded), len(present))
    return length >= HASH_SHOWN and recorded[:length].lower() == present[:length].lower()
