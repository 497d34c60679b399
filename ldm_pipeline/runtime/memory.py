"""Memory helpers for small GPUs: attention slicing, VAE slicing, VAE tiling, model CPU offload.

Each helper switches on a mechanism a well-kept library already has, and the matching
`disable_` puts the model back as it was:

- attention slicing: diffusers' sliced attention processors (`UNet2DConditionModel.set_attention_slice`),
  which compute attention a few heads at a time; the processors in place before are restored.
- VAE slicing: diffusers' `AutoencoderKL.use_slicing`, one image at a time through the VAE.
- VAE tiling: diffusers' tiled encode and decode (`use_tiling`): overlapping tiles whose
  overlaps are blended linearly, so the seams do not show; images no larger than one tile are
  not tiled. `tile_size` chooses the tile in pixels (default: the VAE's `sample_size`, 512 for SD).
- model CPU offload: accelerate's `cpu_offload_with_hook` on each model, so a model is moved to
  the GPU when it runs. Where diffusers chains the hooks in one order (text encoder -> UNet ->
  VAE), which leaves the VAE on the GPU beside the UNet in image-to-image (the VAE encodes
  before the UNet runs), here every model sends the others back to the CPU before it runs, so
  at most one model is on the GPU at any time, whatever the order of the calls.
"""

from __future__ import annotations

import torch
from accelerate.hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module

from . import checks


def enable_attention_slicing(unet, slice_size: str | int = "auto") -> dict:
    """Attention in slices of `slice_size` heads ("auto": half, "max": one at a time).

    Returns:
        The attention processors that were in place, for `disable_attention_slicing`.
    """
    checks.check_slice_size(slice_size)
    previous = dict(unet.attn_processors)
    unet.set_attention_slice(slice_size)
    return previous


def disable_attention_slicing(unet, previous: dict | None) -> None:
    """Put back the attention processors that `enable_attention_slicing` replaced."""
    if previous is not None:
        unet.set_attn_processor(previous)


def enable_vae_slicing(vae) -> None:
    """Encode and decode a batch one image at a time (same pixels, a batch's memory divided by its size)."""
    vae.use_slicing = True


def disable_vae_slicing(vae) -> None:
    vae.use_slicing = False


def enable_vae_tiling(vae, tile_size: int | None, factor: int) -> None:
    """Encode and decode images larger than `tile_size` pixels in blended, overlapping tiles.

    Args:
        tile_size: the tile's side in pixels, a multiple of `factor`; None: the VAE's `sample_size`.
        factor: the VAE's downsampling factor (8 for SD).
    """
    checks.check_tile_size(tile_size, factor)
    size = tile_size or vae.config.sample_size
    vae.tile_sample_min_size = size
    vae.tile_latent_min_size = size // factor
    vae.use_tiling = True


def disable_vae_tiling(vae) -> None:
    vae.use_tiling = False


class ModelOffload:
    """Text encoder, UNet and VAE kept on the CPU, each moved to `device` only while it runs.

    Args:
        models: the models to manage.
        device: where they run (e.g. "cuda"); the hooks move a model's inputs there too.
    """

    def __init__(self, models: list[torch.nn.Module], device: torch.device | str):
        self.device = torch.device(device)
        self.models = models
        self.hooks = []
        for model in models:
            hook = _OffloadOthers(self.device, self.hooks)  # sees the whole list once it is filled
            add_hook_to_module(model, hook, append=True)  # runs init_hook: the model goes to the CPU
            self.hooks.append(UserCpuOffloadHook(model, hook))

    def offload_all(self) -> None:
        """Send every model back to the CPU (after a call, so that the GPU is free between calls)."""
        _offload(self.hooks, keep=None)

    def remove(self) -> None:
        """Take the hooks off; the models stay on the CPU."""
        for hook in self.hooks:
            hook.remove()
        for model in self.models:
            model.to("cpu")


def _offload(hooks, keep) -> None:
    for hook in hooks:
        if hook.model is not keep and hook.hook.loaded:
            hook.offload()
            hook.hook.loaded = False


class _OffloadOthers(CpuOffload):
    """accelerate's CPU offload hook, which first sends every other model of its group to the CPU.

    It runs before `forward`, and before the VAE's `encode`/`decode` (diffusers calls the hook there).
    """

    def __init__(self, device: torch.device, group: list):
        super().__init__(execution_device=device)
        self.group = group
        self.loaded = False  # on the execution device (kept here: reading it off the weights costs a walk)

    def pre_forward(self, module, *args, **kwargs):
        _offload(self.group, keep=module)
        self.loaded = True
        return super().pre_forward(module, *args, **kwargs)


class MemoryMethods:
    """The pipeline's `enable_`/`disable_` methods (each returns the pipeline), kept here beside what they switch.

    The pipeline provides `unet`, `vae`, `text_encoder`, `vae_scale_factor`, and the attributes
    `offload` and `_attention_processors` (None at first).
    """

    def enable_attention_slicing(self, slice_size: str | int = "auto"):
        """Attention a few heads at a time ("auto": half, "max": one, or a number): less memory, same pixels."""
        previous = enable_attention_slicing(self.unet, slice_size)
        self._attention_processors = self._attention_processors or previous
        return self

    def disable_attention_slicing(self):
        disable_attention_slicing(self.unet, self._attention_processors)
        self._attention_processors = None
        return self

    def enable_vae_slicing(self):
        """Encode and decode one image at a time: same pixels, a batch's VAE memory divided by its size."""
        enable_vae_slicing(self.vae)
        return self

    def disable_vae_slicing(self):
        disable_vae_slicing(self.vae)
        return self

    def enable_vae_tiling(self, tile_size: int | None = None):
        """Encode and decode images larger than a tile (default 512 px for SD) in blended overlapping tiles."""
        enable_vae_tiling(self.vae, tile_size, self.vae_scale_factor)
        return self

    def disable_vae_tiling(self):
        disable_vae_tiling(self.vae)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str | None = None):
        """Keep the models on the CPU, each on `device` (default: the GPU) only while it runs."""
        device = checks.check_offload_device(device)
        self.disable_model_cpu_offload()
        encoders = [model for name, model in self.named_models if name.startswith("text_encoder")]
        self.offload = ModelOffload([*encoders, self.unet, self.vae], device)
        return self

    def disable_model_cpu_offload(self):
        """Take the offload hooks off; the models stay on the CPU (`.to()` moves them)."""
        if self.offload:
            self.offload.remove()
            self.offload = None
        return self
