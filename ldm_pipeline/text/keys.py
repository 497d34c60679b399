"""The text's keys and values for cross-attention, computed once per call instead of at every step.

Each cross-attention layer of the UNet projects the text embeddings to keys and values
(`attn.to_k(context)`, `attn.to_v(context)`). The context is the same at every denoising step, so
these projections are the same 50 times over: on the bundled model they are about a tenth of the
UNet's arithmetic (77 text tokens against 64 or 16 latent cells). The compiled path
(`fast.AotUNet`) exports a UNet that takes them as inputs (`GivenText`), and computes them once
per call (`keys_values`). The eager path keeps diffusers' processors, so it stays the same
computation as diffusers'.

Only the plain form of cross-attention is taken (no normalisation of the text, no group or spatial
norm, no residual, no rescaling, no q/k norms, diffusers' default processors);
`text_attentions` returns None for any other UNet, and the compiled path then takes the context
as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _plain(attn) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    return (getattr(attn, "is_cross_attention", False) and attn.spatial_norm is None and attn.group_norm is None
            and not attn.norm_cross and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and attn.norm_q is None and attn.norm_k is None
            and type(attn.processor) in (AttnProcessor, AttnProcessor2_0))


def cross_attentions(unet) -> list:
    """The UNet's cross-attention layers in module order (a walk over every module)."""
    from diffusers.models.attention_processor import Attention
    return [module for module in unet.modules() if isinstance(module, Attention) and module.is_cross_attention]


def text_attentions(unet, layers: list | None = None) -> list | None:
    """The UNet's cross-attention layers (`layers`, when already found), or None when one of them is not
    of the plain form this module computes (or there are none)."""
    layers = cross_attentions(unet) if layers is None else layers
    return layers if layers and all(_plain(attn) for attn in layers) else None


def keys_values(layers, context: torch.Tensor) -> list[torch.Tensor]:
    """[key, value, key, value, ...] of each layer for `context` (B, L, D), each (B, heads, L, head_dim),
    contiguous: the inputs a `GivenText` module takes after the sample and timestep."""
    batch, length, _ = context.shape
    out = []
    for attn in layers:
        for project in (attn.to_k, attn.to_v):
            out.append(project(context).view(batch, length, attn.heads, -1).transpose(1, 2).contiguous())
    return out


class GivenKeysValues:
    """A cross-attention processor that takes the text's keys and values from `.key` and `.value`
    (set before each UNet call) instead of projecting the context it is handed."""

    def __init__(self):
        self.key = self.value = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, cells, _ = hidden_states.shape
        query = attn.to_q(hidden_states).view(batch, cells, attn.heads, -1).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(query, self.key, self.value, attn_mask=attention_mask)
        mixed = mixed.transpose(1, 2).reshape(batch, cells, -1).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](mixed))


class GivenText(torch.nn.Module):
    """The UNet as `(sample, timestep, key_1, value_1, key_2, ...[, text_embeds, time_ids]) -> noise`, the
    form torch.export takes when the text's keys and values come from outside (and, with `added`, SDXL's
    added conditions).

    While it runs, its cross-attention layers use `GivenKeysValues` processors; `restore()` puts the
    UNet's own processors back (call it once the module has been exported).
    """

    def __init__(self, unet, layers, added: bool = False):
        super().__init__()
        self.unet, self.layers, self.added = unet, layers, added  # added: the last two inputs are SDXL's
        self.originals = [attn.processor for attn in layers]
        self.given = [GivenKeysValues() for _ in layers]
        for attn, processor in zip(layers, self.given):
            attn.set_processor(processor)

    def forward(self, sample, timestep, *inputs):
        keys_values, added = (inputs[:-2], inputs[-2:]) if self.added else (inputs, ())
        for index, processor in enumerate(self.given):
            processor.key, processor.value = keys_values[2 * index], keys_values[2 * index + 1]
        # The blocks hand the context to cross-attention only, which takes the given keys instead;
        # an empty one keeps the UNet's signature without carrying the text.
        batch = sample.shape[0]
        context = sample.new_zeros(batch, 0, self.layers[0].to_k.in_features)
        added_cond_kwargs = {"text_embeds": added[0], "time_ids": added[1]} if added else None
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False,
                         added_cond_kwargs=added_cond_kwargs)[0]

    def restore(self) -> None:
        for attn, processor in zip(self.layers, self.originals):
            attn.set_processor(processor)
