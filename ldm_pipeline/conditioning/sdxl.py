"""SDXL's added conditions: the pooled text projection and the size (or aesthetic) ids, beside the context.

An SDXL UNet (`addition_embed_type="text_time"`) takes, besides the context, `added_cond_kwargs`:
`text_embeds`, the second tower's pooled projection (B, P), and `time_ids` (B, T), the numbers
`original_size + crops_coords_top_left + target_size` (T = 6; a refiner with `requires_aesthetics_score`
takes `original_size + crops_coords_top_left + (aesthetic_score,)`, T = 5). Each guidance copy has its own:
the negative prompt's pooled projection and the negative sizes / aesthetic score go with its context.

So that every copy the loop batches (`[guidance contexts..., cond]`, `sampling.loop.denoise`) carries its
own conditions, whatever the guidance, they ride on the context itself: `pack` appends them to each row as
extra token rows (the P + T numbers laid out over ceil((P + T) / D) rows of width D, zero-padded), and
`AddedConditionsUNet`, a wrapper with the UNet's signature `unet(x, t, encoder_hidden_states=context)`,
takes them off again before the UNet's cross-attention sees the context; an SDXL ControlNet is wrapped
alike. The numbers are kept in the context's dtype, as diffusers makes them (sizes are integers, exact in
fp16 up to 2048 and for multiples of 8 far beyond).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """How the added conditions sit on a packed context: P pooled numbers, then T time ids, over `rows` rows."""

    pooled_dim: int
    time_dim: int
    width: int  # the context's features per token (the UNet's cross-attention width)

    @property
    def rows(self) -> int:
        return math.ceil((self.pooled_dim + self.time_dim) / self.width)

    def pack(self, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) context, (B, P) pooled and (B, T) time ids -> the (B, L + rows, D) packed context."""
        batch = context.shape[0]
        if pooled.shape != (batch, self.pooled_dim) or time_ids.shape != (batch, self.time_dim):
            raise ValueError(f"`pooled_prompt_embeds`: got {tuple(pooled.shape)} with time ids "
                             f"{tuple(time_ids.shape)}; the UNet takes ({batch}, {self.pooled_dim}) and "
                             f"({batch}, {self.time_dim})")
        extra = torch.cat([pooled.to(context.dtype), time_ids.to(context.device, context.dtype)], dim=1)
        extra = torch.nn.functional.pad(extra, (0, self.rows * self.width - extra.shape[1]))
        return torch.cat([context, extra.reshape(batch, self.rows, self.width)], dim=1)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed (B, L + rows, D) context -> context (B, L, D), pooled (B, P), time ids (B, T)."""
        extra = packed[:, -self.rows:].reshape(packed.shape[0], -1)
        pooled, time_ids = extra[:, :self.pooled_dim], extra[:, self.pooled_dim:self.pooled_dim + self.time_dim]
        return packed[:, :-self.rows].contiguous(), pooled.contiguous(), time_ids.contiguous()

    def context_shape(self, packed_shape: tuple) -> tuple:
        """The (L, D) shape the UNet sees for a packed context's (L + rows, D)."""
        return (packed_shape[0] - self.rows, *packed_shape[1:])


def layout_of(unet, aesthetic: bool) -> Layout:
    """The layout an SDXL UNet's added embedding takes: T = 5 with an aesthetic score, else 6; P is the rest of
    its input (`projection_class_embeddings_input_dim`)."""
    time_dim = 5 if aesthetic else 6
    config = unet.config
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(f"`unet`: an SDXL UNet takes added text and time conditions (addition_embed_type "
                         f"'text_time'); this one has {config.get('addition_embed_type')!r}")
    total = unet.add_embedding.linear_1.in_features
    pooled = total - config.addition_time_embed_dim * time_dim
    if pooled <= 0:
        raise ValueError(f"`unet`: its added embedding takes {total} numbers, too few for {time_dim} time ids of "
                         f"{config.addition_time_embed_dim}; is `requires_aesthetics_score` right for this model?")
    return Layout(pooled_dim=pooled, time_dim=time_dim, width=config.cross_attention_dim)


def time_ids(settings, height: int, width: int, aesthetic: bool) -> tuple[list[float], list[float]]:
    """The positive and negative time ids of a call drawn at (height, width).

    `original_size` and `target_size` default to the drawn size; the negative ones to the positive ones, and
    `negative_crops_coords_top_left` to `crops_coords_top_left`.
    """
    s = settings
    original = tuple(s.original_size or (height, width))
    target = tuple(s.target_size or (height, width))
    crops = tuple(s.crops_coords_top_left)
    negative_original = tuple(s.negative_original_size or original)
    negative_target = tuple(s.negative_target_size or target)
    negative_crops = tuple(s.negative_crops_coords_top_left if s.negative_crops_coords_top_left is not None
                           else crops)
    if aesthetic:
        return ([*original, *crops, s.aesthetic_score],
                [*negative_original, *negative_crops, s.negative_aesthetic_score])
    return [*original, *crops, *target], [*negative_original, *negative_crops, *negative_target]


def check_pooled(pooled_dim: int, given: torch.Tensor | None, name: str, rows: int) -> None:
    """Given pooled embeddings: (rows, P)."""
    if given is not None and (not isinstance(given, torch.Tensor) or tuple(given.shape) != (rows, pooled_dim)):
        shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
        raise ValueError(f"`{name}`: got {shape}; expected a ({rows}, {pooled_dim}) tensor (the second text "
                         "encoder's pooled projection, one row per prompt)")


class AddedConditionsUNet:
    """An SDXL UNet with the plain signature `unet(x, t, encoder_hidden_states=packed)`: it takes the pooled
    projection and time ids off each row of the packed context and passes them as `added_cond_kwargs`.

    An SDXL ControlNet (`addition_embed_type="text_time"`) takes them the same way, so it is wrapped alike:
    `ControlledUNet` hands it the packed rows of the copies it runs on, and the other keyword arguments
    (`controlnet_cond`, `conditioning_scale`, ...) pass through."""

    def __init__(self, unet, layout: Layout):
        self.unet, self.layout = unet, layout

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        context, pooled, ids = self.layout.unpack(encoder_hidden_states)
        return self.unet(sample, timestep, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, **kwargs)
