"""hash_state: same values, same digest (whatever the dtype they are stored in, unless asked); any change shows."""

import hashlib

import torch

from ldm_pipeline.provenance.hashes import hash_state, weights_state


def _digest(state, **options) -> str:
    digest = hashlib.blake2b(digest_size=16)
    hash_state(digest, state, **options)
    return digest.hexdigest()


def test_values_decide_the_digest_and_storage_dtype_only_when_asked():
    half = {"b": torch.tensor([0.1, 2.5], dtype=torch.float16), "a": torch.arange(3)}
    cast = {name: (t.float() if t.is_floating_point() else t) for name, t in half.items()}
    assert _digest(half) == _digest(cast) == _digest(dict(reversed(list(cast.items()))))  # order of keys: no
    assert _digest(half, as_fp32=False) != _digest(cast, as_fp32=False)  # the bytes a compiled artefact bakes in
    changed = {**cast, "b": cast["b"] + 1e-3}
    assert _digest(changed) != _digest(cast)
    assert _digest(cast, prefix="vae.") != _digest(cast)
    assert _digest({"b": cast["b"].reshape(2, 1), "a": cast["a"]}) != _digest(cast)  # same bytes, other shape


def test_weights_state_sees_in_place_changes_and_casts():
    layer = torch.nn.Linear(2, 2)
    before = weights_state(layer)
    assert weights_state(layer) == before
    with torch.no_grad():
        layer.weight.add_(1.0)
    after = weights_state(layer)
    assert after != before
    assert weights_state(layer.half()) != after
