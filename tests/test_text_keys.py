"""The text's cross-attention keys and values given from outside: the UNet's own output, to the bit."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

from ldm_pipeline.fast import compile as fast
from ldm_pipeline.text.keys import GivenText, keys_values, text_attentions


def inputs(unet, batch=2, length=77):
    torch.manual_seed(0)
    side = unet.config.sample_size
    return (torch.randn(batch, unet.config.in_channels, side, side), torch.tensor(500.0),
            torch.randn(batch, length, unet.config.cross_attention_dim))


@torch.no_grad()
def test_a_unet_given_the_text_keys_draws_what_it_draws_from_the_context(components):
    unet = components["unet"]
    sample, timestep, context = inputs(unet)
    expected = unet(sample, timestep, encoder_hidden_states=context).sample
    layers = text_attentions(unet)
    assert layers and all(attn.is_cross_attention for attn in layers)
    given = GivenText(unet, layers)
    got = given(sample, timestep, *keys_values(layers, context))
    given.restore()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(type(attn.processor) is AttnProcessor2_0 for attn in layers)  # the UNet's own again
    torch.testing.assert_close(unet(sample, timestep, encoder_hidden_states=context).sample, expected, rtol=0, atol=0)


@torch.no_grad()
def test_keys_values_are_per_layer_and_head(components):
    unet = components["unet"]
    _, _, context = inputs(unet, batch=3, length=5)
    layers = text_attentions(unet)
    pairs = keys_values(layers, context)
    assert len(pairs) == 2 * len(layers)
    for attn, key in zip(layers, pairs[::2]):
        assert key.shape == (3, attn.heads, 5, attn.to_k.out_features // attn.heads) and key.is_contiguous()
        torch.testing.assert_close(key.transpose(1, 2).reshape(3, 5, -1), attn.to_k(context))


def test_another_kind_of_cross_attention_keeps_the_context_as_the_input(components):
    unet = components["unet"]
    digest = fast.weights_digest(unet)
    plain = fast.package_key(unet, digest, (4, 8, 8), (77, 32), 2)
    layer = text_attentions(unet)[0]
    original = layer.processor
    layer.set_processor(SlicedAttnProcessor(1))
    try:
        assert text_attentions(unet) is None  # not a form GivenText computes
        assert fast.package_key(unet, digest, (4, 8, 8), (77, 32), 2) != plain  # nor the same package
    finally:
        layer.set_processor(original)
    assert text_attentions(unet) is not None


@pytest.mark.parametrize("kind", ["norm_cross", "residual_connection"])
def test_a_cross_attention_with_extras_is_not_taken(components, kind):
    layer = text_attentions(components["unet"])[0]
    saved = getattr(layer, kind)
    setattr(layer, kind, True)
    try:
        assert text_attentions(components["unet"]) is None
    finally:
        setattr(layer, kind, saved)
