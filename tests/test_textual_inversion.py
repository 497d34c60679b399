"""Textual inversion: diffusers' and A1111's embedding files, diffusers' pixels, recipes that name them."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from ldm_pipeline import LatentDiffusionPipeline, read_recipe

KW = dict(num_inference_steps=4, guidance_scale=4.0, height=16, width=16)


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def embedding(vectors, seed=0, dim=32):
    torch.manual_seed(seed)
    return torch.randn(vectors, dim) * 0.5


@pytest.mark.parametrize("vectors", [1, 3])
def test_an_embedding_draws_what_diffusers_draws(components, tmp_path, vectors):
    save_file({"<shape>": embedding(vectors)}, tmp_path / "learned_embeds.safetensors")
    negative = tmp_path / "bad.safetensors"
    save_file({"emb_params": embedding(2, seed=1)}, negative)  # A1111's safetensors: the token is the file's name
    ours = LatentDiffusionPipeline(**copy.deepcopy(components))
    ours.load_textual_inversion(tmp_path)
    ours.load_textual_inversion(negative)
    assert set(ours.embeddings) == {"<shape>", "bad"}
    mine = ours("a <shape> in the top left", negative_prompt="bad", seed=0, progress=False, **KW).images
    theirs = StableDiffusionPipeline(**copy.deepcopy(components), safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    theirs.load_textual_inversion({"bad": embedding(2, seed=1)})
    reference = theirs("a <shape> in the top left", negative_prompt="bad",
                       generator=[torch.Generator().manual_seed(0)], **KW).images
    assert np.abs(pixels(mine) - pixels(reference)).max() <= 1
    plain = ours("a in the top left", negative_prompt="", seed=0, progress=False, **KW).images
    assert np.abs(pixels(mine) - pixels(plain)).max() > 4  # the embeddings did something


def test_a1111_pt_files_need_the_pickle_opt_in(pipe, tmp_path):
    torch.save({"string_to_param": {"*": embedding(2)}, "name": "star-style"}, tmp_path / "star.pt")
    with pytest.raises(ValueError, match=r"is a pickle, which can run code when loaded"):
        pipe.load_textual_inversion(tmp_path / "star.pt")
    pipe.load_textual_inversion(tmp_path / "star.pt", allow_pickle=True)
    assert pipe.embeddings["star-style"]["vectors"] == 2
    assert {"star-style", "star-style_1"} <= set(pipe.tokenizer.get_vocab())


def test_the_recipe_names_the_embeddings_and_reproduce_needs_them(components, tmp_path):
    save_file({"<shape>": embedding(2)}, tmp_path / "shape.safetensors")
    pipe = LatentDiffusionPipeline(**copy.deepcopy(components)).load_textual_inversion(tmp_path / "shape.safetensors")
    result = pipe("a <shape>", seed=2, progress=False, **KW)
    path = result.save(tmp_path / "out.png")[0]
    recipe = read_recipe(path)
    assert recipe.embeddings[0]["token"] == "<shape>" and len(recipe.embeddings[0]["sha256"]) == 64
    assert f"TI hashes: \"<shape>: {recipe.embeddings[0]['sha256'][:12]}\"" in recipe.parameters()
    assert np.array_equal(pixels(pipe.reproduce(path, progress=False).images), pixels(result.images))
    with pytest.raises(ValueError, match=r"`source`: the image was drawn with textual-inversion embeddings <shape>"):
        LatentDiffusionPipeline(**copy.deepcopy(components)).reproduce(path, progress=False)


@pytest.mark.parametrize("state, token, error, message", [
    ({"<new>": torch.zeros(16)}, None, ValueError, r"has 16 features per vector; this text encoder takes 32"),
    ({"<new>": torch.zeros(32), "<b>": torch.zeros(32)}, None, ValueError, r"not a textual-inversion embedding"),
    ({"<new>": torch.zeros(2, 2, 32)}, None, ValueError, r"not a \(dim,\) or \(vectors, dim\) float tensor"),
    ({"a photo": torch.zeros(32)}, "a", ValueError, r"`token`: 'a' is already in the tokenizer's vocabulary"),
])
def test_bad_embeddings_are_refused_and_change_nothing(pipe, state, token, error, message):
    size = len(pipe.tokenizer)
    rows = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    with pytest.raises(error, match=message):
        pipe.load_textual_inversion(state, token=token)
    assert len(pipe.tokenizer) == size and pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows
    assert pipe.embeddings == {}
