"""Long prompts in 75-token windows (the web UI's way), the opt-in `(word:1.3)` weighting, compel embeddings."""

import warnings

import numpy as np
import pytest
import torch

from ldm_pipeline.text import windows as prompts, encode as text

FAST = dict(num_inference_steps=2, progress=False, output_type="np", seed=0)
SHORT = ["a red circle in the top left", "a photo of a cat", "", "a painting of a house by the sea"]
# 20 repeats of 7 words: 140 prompt tokens, two windows; the second half names other colours, so it matters
LONG = " ".join(["a red circle in the top left"] * 10 + ["a small blue square in the center"] * 10)


def test_short_prompts_keep_exactly_todays_tokens_and_embeddings(pipe):
    tokenizer = pipe.tokenizer
    windows = prompts.windows(tokenizer, SHORT, 1)
    today = text.tokenize(tokenizer, SHORT)
    assert torch.equal(windows["input_ids"][:, 0], today["input_ids"])
    assert torch.equal(windows["attention_mask"][:, 0], today["attention_mask"])
    # the encoder on one window, through the windowed path, and through today's path: the same numbers
    embeddings = text.encode_windows(tokenizer, pipe.text_encoder, SHORT)
    assert torch.equal(embeddings, text.encode_text(tokenizer, pipe.text_encoder, SHORT))
    forced = pipe.text_encoder(windows["input_ids"].flatten(0, 1))[0]
    assert torch.equal(embeddings, forced)


def test_short_prompt_pixels_are_unchanged(pipe):
    embeds = text.encode_text(pipe.tokenizer, pipe.text_encoder, ["a cat"])
    empty = text.encode_text(pipe.tokenizer, pipe.text_encoder, [""])
    reference = pipe(prompt_embeds=embeds, negative_prompt_embeds=empty, **FAST).images
    assert np.array_equal(pipe("a cat", **FAST).images, reference)


def test_long_prompt_is_read_in_windows_not_cut(pipe):
    tokenizer = pipe.tokenizer
    ids, _ = prompts.token_ids(tokenizer, LONG)
    assert len(ids) == 140 and prompts.chunks_needed(tokenizer, [LONG]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing to warn about
        embeddings = pipe.encode_prompt(LONG)
    assert embeddings.shape == (1, 154, 32)
    # each window is the text encoder's reading of [start, 75 tokens, end, padding] on its own
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    first = torch.tensor([[start, *ids[:75], end]])
    second = torch.tensor([[start, *ids[75:], end] + [pad] * (75 - 65)])
    torch.testing.assert_close(embeddings[:, :77], pipe.text_encoder(first)[0])
    torch.testing.assert_close(embeddings[:, 77:], pipe.text_encoder(second)[0])
    # the tail of the prompt reaches the image: it differs from the image of the first window alone
    cut = pipe(prompt_embeds=embeddings[:, :77], **FAST).images
    assert not np.allclose(pipe(LONG, **FAST).images, cut, atol=1e-3)


def test_prompt_and_negative_prompt_are_padded_to_the_same_windows(pipe):
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    empty_window = text.encode_text(tokenizer, encoder, [""])
    cond, uncond = text.encode_prompts(tokenizer, encoder, [LONG], negative_prompts=["blurry"])
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(uncond[:, :77], text.encode_text(tokenizer, encoder, ["blurry"]))
    torch.testing.assert_close(uncond[:, 77:], empty_window)
    cond, uncond = text.encode_prompts(tokenizer, encoder, ["a cat"], negative_prompts=[LONG])
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[:, 77:], empty_window)
    # batches: every prompt gets as many windows as the longest
    cond, uncond = text.encode_prompts(tokenizer, encoder, ["a cat", LONG], num_images_per_prompt=2)
    assert cond.shape == uncond.shape == (4, 154, 32)
    assert pipe(["a cat", LONG], negative_prompt=["", "blurry"], **FAST).images.shape == (2, 16, 16, 3)


def test_long_prompt_embeddings_split_equal_the_whole(pipe):
    embeds = pipe.encode_prompt(LONG)
    assert np.array_equal(pipe(prompt_embeds=embeds, **FAST).images, pipe(LONG, **FAST).images)
    with pytest.raises(ValueError, match=r"`prompt_embeds`: 100 tokens, not a multiple of the tokenizer's 77"):
        pipe(prompt_embeds=torch.zeros(1, 100, 32), **FAST)
    with pytest.raises(ValueError, match=r"`negative_prompt_embeds`: 77 tokens, but the other side's prompts need "
                                         r"154"):
        pipe(LONG, negative_prompt_embeds=pipe.encode_prompt(""), **FAST)


def test_the_compiled_unet_is_asked_for_the_long_context(pipe):
    seen = []

    class Recorder:
        def runner_for(self, unet, sample_shape, context_shape, added=None):
            seen.append((tuple(sample_shape), tuple(context_shape)))
            return unet

    pipe.compiled = Recorder()
    pipe(LONG, **FAST)
    pipe("a cat", **FAST)
    assert seen == [((4, 8, 8), (154, 32)), ((4, 8, 8), (77, 32))]


def test_embedding_cache_keys_on_the_windows(pipe):
    cache = text.EmbeddingCache()
    one = cache.encode(pipe.tokenizer, pipe.text_encoder, ["a cat"])
    two = cache.encode(pipe.tokenizer, pipe.text_encoder, ["a cat"], 2)
    assert one.shape == (1, 77, 32) and two.shape == (1, 154, 32)
    assert cache.encode(pipe.tokenizer, pipe.text_encoder, ["a cat"]) is one


# -- weighting --------------------------------------------------------------------------------


@pytest.mark.parametrize("source, expected", [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("(red)", [("red", 1.1)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("(a (red:2) circle:0.5)", [("a ", 0.5), ("red", 1.0), (" circle", 0.5)]),
    ("(red:.5)", [("red", 0.5)]),
    (r"\(red\) and \[x\]", [("(red) and [x]", 1.0)]),
    ("red) circle: big", [("red) circle: big", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),
    ("(red:abc)", [("red:abc", 1.1)]),
])
def test_weighting_syntax(source, expected):
    parsed = prompts.parse_weights(source)
    assert [p[0] for p in parsed] == [e[0] for e in expected]
    assert np.allclose([p[1] for p in parsed], [e[1] for e in expected])


def test_weight_one_gives_identical_embeddings(pipe):
    plain = pipe.encode_prompt("a red circle in the top left")
    assert torch.equal(pipe.encode_prompt("a (red:1.0) circle in the (top:1) left", prompt_weighting=True), plain)
    assert torch.equal(pipe.encode_prompt("a red circle in the top left", prompt_weighting=True), plain)
    long = pipe.encode_prompt(LONG)
    assert torch.equal(pipe.encode_prompt(LONG.replace("red", "(red:1.0)"), prompt_weighting=True), long)


def test_a_weight_scales_only_its_tokens_then_the_mean_is_restored(pipe):
    plain = pipe.encode_prompt("a red circle in the top left")
    weighted = pipe.encode_prompt("a (red:1.5) circle in the top left", prompt_weighting=True)
    position = 2  # [start, "a", "red", ...]
    ratio = weighted / plain
    others = torch.cat([ratio[0, :position], ratio[0, position + 1:]])
    scale = others.flatten()[0]
    torch.testing.assert_close(others, torch.full_like(others, scale.item()))  # one factor everywhere else
    torch.testing.assert_close(ratio[0, position], torch.full_like(ratio[0, position], 1.5 * scale.item()))
    torch.testing.assert_close(weighted.mean(), plain.mean())  # the mean restored
    # without weighting, the brackets are only text
    assert not torch.equal(pipe.encode_prompt("a (red:1.5) circle"), weighted[:, :77])


def test_the_mean_is_restored_only_where_it_is_not_rounding_noise():
    torch.manual_seed(0)
    weights = torch.ones(2, 5)
    weights[:, 1] = 1.8
    offset = torch.randn(2, 5, 8) + 0.5  # a clear mean, as CLIP's biased last layer norm gives
    restored = prompts.apply_weights(offset, weights)
    torch.testing.assert_close(restored.mean(dim=(1, 2)), offset.mean(dim=(1, 2)))
    centred = torch.randn(2, 5, 8)
    centred = centred - centred.mean(dim=2, keepdim=True)  # each token averages to zero, as an unbiased layer norm gives
    scaled = prompts.apply_weights(centred, weights)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, centred * weights[:, :, None])  # plain scaling, not divided by noise


def test_weighting_reaches_the_pixels_and_applies_to_negative_prompts(pipe):
    plain = pipe("a red circle", **FAST).images
    assert not np.allclose(pipe("a (red:1.8) circle", prompt_weighting=True, **FAST).images, plain, atol=1e-4)
    assert np.array_equal(pipe("a (red:1) circle", prompt_weighting=True, **FAST).images, plain)
    cond, uncond = text.encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a cat"], negative_prompts=["(blurry:1.4)"],
                                       weighting=True)
    assert not torch.equal(uncond, text.encode_text(pipe.tokenizer, pipe.text_encoder, ["blurry"]))
    with pytest.raises(TypeError, match=r"`prompt_weighting`: got 'yes'; expected True or False"):
        pipe("a cat", prompt_weighting="yes", **FAST)


def test_compel_embeddings_work_through_prompt_embeds(pipe):
    compel = pytest.importorskip("compel")
    build = compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    plain = build("a red circle")
    assert torch.equal(plain, pipe.encode_prompt("a red circle"))  # compel reads a plain prompt as we do
    images = pipe(prompt_embeds=plain, negative_prompt_embeds=build(""), **FAST).images
    assert np.array_equal(images, pipe("a red circle", **FAST).images)
    weighted = pipe(prompt_embeds=build("a red++ circle"), negative_prompt_embeds=build(""), **FAST).images
    assert np.isfinite(weighted).all() and not np.allclose(weighted, images, atol=1e-4)


def test_weighted_and_long_prompts_round_trip_through_recipes(pipe, tmp_path):
    from ldm_pipeline import read_recipe

    for name, prompt, weighting in (("weighted", "a (red:1.8) circle", True), ("long", LONG, False)):
        result = pipe(prompt, prompt_weighting=weighting, num_inference_steps=2, seed=3, progress=False)
        [path] = result.save(tmp_path / f"{name}.png")
        assert read_recipe(path).prompt_weighting is weighting and read_recipe(path).prompt == prompt
        again = pipe.reproduce(path, progress=False)
        assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_embedding_length_errors_come_before_the_text_encoder_runs(pipe, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the text encoder ran")

    monkeypatch.setattr(pipe.text_encoder, "forward", forbidden)
    with pytest.raises(ValueError, match=r"`negative_prompt_embeds`: 77 tokens, but the other side's prompts need 154"):
        pipe(LONG, negative_prompt_embeds=torch.zeros(1, 77, 32), **FAST)
    with pytest.raises(ValueError, match=r"`prompt_embeds`: 100 tokens, not a multiple"):
        pipe(prompt_embeds=torch.zeros(1, 100, 32), negative_prompt="blurry", **FAST)
