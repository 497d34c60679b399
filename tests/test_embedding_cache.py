"""Text embeddings reused across calls (pipeline) and across steps (UNet trainer), never stale."""

import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer

from ldm_pipeline import DEFAULT_MODEL, LatentDiffusionPipeline
from ldm_pipeline.text.encode import EmbeddingCache, encode_text
from ldm_pipeline.training.unet import encode_captions

PROMPT = "a red circle in the top left"


def encoder_calls(text_encoder):
    calls = []
    handle = text_encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]),
                                                    with_kwargs=True)
    return calls, handle


def draw(pipe, prompt=PROMPT):
    return pipe(prompt, seed=0, num_inference_steps=3, guidance_scale=4.0, progress=False, output_type="np").images


def test_a_repeated_prompt_and_the_empty_negative_are_encoded_once(components):
    pipe = LatentDiffusionPipeline(**components)
    calls, handle = encoder_calls(pipe.text_encoder)
    first = draw(pipe)
    assert len(calls) == 2  # the prompt and ""
    second = draw(pipe)
    assert len(calls) == 2  # both from the cache
    draw(pipe, "a photo of a cat")
    assert len(calls) == 3  # only the new prompt; "" is still cached
    handle.remove()
    np.testing.assert_array_equal(first, second)


def test_a_changed_text_encoder_is_encoded_again_and_draws_what_a_fresh_pipeline_draws(components):
    pipe = LatentDiffusionPipeline(**components)
    before = draw(pipe)
    with torch.no_grad():
        weight = pipe.text_encoder.get_input_embeddings().weight  # changed in place, as a fine-tune would
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    after = draw(pipe)
    pipe.embedding_cache = EmbeddingCache()  # a cold cache: what the changed encoder really gives
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, draw(pipe))


def test_cached_embeddings_are_not_changed_by_a_call(components):
    pipe = LatentDiffusionPipeline(**components)
    draw(pipe)
    cached = {key: value.clone() for key, value in pipe.embedding_cache._entries.items()}
    draw(pipe)
    pipe(PROMPT, seed=0, num_inference_steps=2, guidance_scale=1.0, progress=False)  # cond used as is
    for key, value in cached.items():
        torch.testing.assert_close(pipe.embedding_cache._entries[key], value, rtol=0, atol=0)


def test_the_trainer_encodes_each_distinct_caption_once_as_the_pipeline_would():
    folder = DEFAULT_MODEL.parent / "shapes_clip"
    tokenizer, text_encoder = CLIPTokenizer.from_pretrained(folder), CLIPModel.from_pretrained(folder).text_model
    captions = ["a red circle in the top left", "", "a blue square in the center", "a red circle in the top left"]
    embeddings, rows = encode_captions(tokenizer, text_encoder, captions, batch_size=2)
    assert embeddings.shape[0] == 3 and rows.tolist()[1] == 0 and rows[0] == rows[3] != rows[2]
    torch.testing.assert_close(embeddings[rows], encode_text(tokenizer, text_encoder, captions),
                               rtol=1e-5, atol=1e-5)
