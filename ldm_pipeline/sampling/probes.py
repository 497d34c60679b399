"""Probes: look inside the denoising loop without changing what it computes.

Each probe is a context manager that hooks a UNet for the length of a `with` block and takes
its hooks off afterwards, even after an error; the UNet's weights, attention processors and
outputs are never touched, so images drawn inside the block equal those drawn outside it.

- `record_cross_attention(unet)`: the softmax of every cross-attention layer, i.e. how much
  each latent cell attends to each prompt token (the maps of Hertz et al. 2022,
  "Prompt-to-Prompt"), averaged over heads, layers and steps.
- `record_x0(unet, scheduler, guidance_scale)`: at every step, the noisy latents x_t the UNet
  saw and its estimate of the clean latents x_0 (the "predicted x_0" of DDIM, Song et al.
  2021, eq. 12): the picture the sampler is steering towards.

    with record_cross_attention(pipe.unet) as attention, record_x0(pipe.unet, pipe.scheduler, 4.0) as steps:
        image = pipe("a red circle in the top left", guidance_scale=4.0, seed=0).images[0]
    maps = attention.maps(64, 64)          # (2, L, 64, 64): [negative prompt, prompt] with guidance
    x0 = steps.x0[10]                      # (1, C, h, w) latents; decode with latents.decode_latents
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..guidance.base import guide
from .loop import x0_from_prediction  # noqa: F401  (part of this module's API)


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The tokens of a prompt as the text encoder sees them, start and end tokens included.

    Position i of the list is position i of the embeddings, so it labels row i of
    `CrossAttentionRecord.maps` (positions after the end token are padding).

    Returns:
        e.g. `["<|startoftext|>", "a", "red", "circle", ..., "<|endoftext|>"]`; CLIP's
        end-of-word marker "</w>" is dropped.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return [token.replace("</w>", "") for token in tokenizer.convert_ids_to_tokens(ids)]


def cross_attention_probs(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
    """The attention probabilities of one cross-attention layer: softmax(q k^T * scale) over tokens.

    Computed from the layer's own projections, as diffusers' `AttnProcessor` does, but without
    the values: a side computation that leaves the layer's output alone.

    Args:
        attn: a diffusers `Attention` layer with `cross_attention_dim`.
        hidden_states: (B, N, C) or (B, C, h, w) image features, N = h * w latent cells.
        context: (B, L, D) text embeddings.
        attention_mask: optional mask over the L tokens, as the layer receives it.

    Returns:
        (B, heads, N, L) float32 probabilities; each row sums to 1 over the L tokens.
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    batch, tokens = context.shape[:2]

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, n, heads * d) -> (B, heads, n, d)
        return x.view(batch, x.shape[1], attn.heads, -1).transpose(1, 2)

    query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(context))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        scores = scores + mask.view(batch, attn.heads, -1, tokens).float()
    return scores.softmax(dim=-1)


@dataclass
class CrossAttentionRecord:
    """Cross-attention probabilities summed over heads, layers and calls, per latent resolution."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # cells N -> (B, N, L) sum of head means
    counts: dict[int, int] = field(default_factory=dict)  # cells N -> layer calls summed

    def add(self, probs: torch.Tensor) -> None:
        """Add one layer call's (B, heads, N, L) probabilities."""
        mean = probs.mean(dim=1).detach().cpu()
        cells = mean.shape[1]
        if cells in self.sums and self.sums[cells].shape != mean.shape:
            raise ValueError(f"cross-attention of shape {tuple(mean.shape)} cannot join the recorded "
                             f"{tuple(self.sums[cells].shape)}; record one batch shape per `with` block")
        self.sums[cells] = self.sums[cells] + mean if cells in self.sums else mean
        self.counts[cells] = self.counts.get(cells, 0) + 1

    def maps(self, height: int, width: int, cells: list[int] | None = None) -> torch.Tensor:
        """Per-token attention maps, every recorded layer call weighing the same.

        Each resolution's mean map is resized (bilinearly) to `height` x `width`; the grid of
        each resolution is worked out from `height / width`, which must be the latents' (or
        the image's) aspect ratio.

        Args:
            height, width: the size of the maps, e.g. the image's size in pixels.
            cells: only the resolutions with these numbers of latent cells (e.g. `[64]` for
                8x8); all recorded ones by default (see `self.counts`).

        Returns:
            (B, L, height, width) float32; B is the UNet's batch (with classifier-free guidance
            `[negative prompts, prompts]`, so the prompts' maps are `maps.chunk(2)[1]`). At
            every pixel the maps of the L tokens sum to 1.
        """
        chosen = sorted(self.sums) if cells is None else list(cells)
        missing = [n for n in chosen if n not in self.sums]
        if not chosen or missing:
            raise ValueError(f"`cells`: nothing recorded at {missing or chosen}; recorded {sorted(self.sums)} "
                             "(was anything drawn inside the `with` block?)")
        total, count = 0.0, 0
        for cells_n in chosen:
            factor = math.sqrt(height * width / cells_n)
            rows, cols = round(height / factor), round(width / factor)
            if rows * cols != cells_n:
                raise ValueError(f"`height`, `width`: {height}x{width} does not match a recorded grid of "
                                 f"{cells_n} cells; pass the latents' or the image's size")
            summed = self.sums[cells_n]  # (B, N, L)
            grid = summed.transpose(1, 2).reshape(summed.shape[0], summed.shape[2], rows, cols)
            total = total + F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            count += self.counts[cells_n]
        return total / count


@contextmanager
def record_cross_attention(unet) -> Iterator[CrossAttentionRecord]:
    """Record the cross-attention probabilities of every UNet call inside the `with` block.

    Forward pre-hooks on the cross-attention layers compute the probabilities next to the
    layer (their own query and key projections, in float32); the layer's processor and output
    are left as they are. The hooks are removed when the block ends.

    Args:
        unet: a diffusers `UNet2DConditionModel` (any module with cross-attention `Attention` layers).

    Yields:
        A `CrossAttentionRecord`; call `.maps(height, width)` after the block.
    """
    record = CrossAttentionRecord()

    def hook(module, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is not None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                record.add(cross_attention_probs(module, hidden, context, kwargs.get("attention_mask"),
                                                 kwargs.get("temb")))

    layers = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    if not layers:
        raise ValueError(f"`unet`: {type(unet).__name__} has no cross-attention layers to record")
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class DenoisingRecord:
    """What the UNet saw and predicted at each step, in order (one entry per UNet call)."""

    timesteps: list[float] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # (B, C, h, w) x_t, variance-preserving scale
    x0: list[torch.Tensor] = field(default_factory=list)  # (B, C, h, w) predicted clean latents


@contextmanager
def record_x0(unet, scheduler, guidance_scale: float) -> Iterator[DenoisingRecord]:
    """Record x_t and the predicted x_0 of every UNet call inside the `with` block.

    A forward hook on the UNet reads its input and output; with `guidance_scale > 1` (the
    pipeline's rule) the batch is `[uncond, cond]` and the two halves are mixed with
    `sampling.guide` first, as the sampler does. Timesteps index the training schedule's
    alpha-bar at the nearest integer, which is exact for the schedulers of `SCHEDULERS` with
    integer timesteps (DDIM, DDPM, DPM-Solver, Euler with "trailing" or "leading" spacing).

    Args:
        unet: the UNet the pipeline calls.
        scheduler: the pipeline's scheduler (for `alphas_cumprod` and `config.prediction_type`).
        guidance_scale: the `guidance_scale` of the call being recorded.

    Yields:
        A `DenoisingRecord`, filled as the UNet runs; latents are kept on the CPU in float32.
    """
    alphas = scheduler.alphas_cumprod.float().cpu()
    prediction_type = scheduler.config.prediction_type
    record = DenoisingRecord()

    def hook(module, args, kwargs, output):
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        prediction = output[0] if isinstance(output, tuple) else output.sample
        if guidance_scale > 1:
            prediction = guide(*prediction.chunk(2), guidance_scale)
            sample = sample.chunk(2)[1]
        t = float(torch.as_tensor(timestep).flatten()[0])
        index = min(max(round(t), 0), len(alphas) - 1)
        with torch.no_grad():
            x0 = x0_from_prediction(sample.detach().cpu(), prediction.detach().cpu(), alphas[index], prediction_type)
        record.timesteps.append(t)
        record.samples.append(sample.detach().float().cpu())
        record.x0.append(x0)

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
