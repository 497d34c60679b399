"""The hires fix (AUTOMATIC1111's "Hires. fix"): draw at the base size, upscale, refine by image-to-image.

A model draws best at the size it was trained at; asked for twice that, it repeats its subject.
So the call's first pass draws at the base size, the result is upscaled, and a second pass adds
detail at the large size: the upscaled picture is noised to `hires_strength` of a `hires_steps`
schedule and denoised with the same prompts, guidance and ControlNets. The upscale happens:

- "latent": in latent space (bilinear), no decode; the default, as in A1111;
- "lanczos": decoded, resized with Lanczos, encoded again;
- a model file (ESRGAN and the like, read with `spandrel`, an optional package), or a callable
  taking and returning an RGB PIL image: decoded, upscaled by it, resized to the target, encoded.

The second pass draws its noise from each image's own generator, after the first pass's draws, so
an image still depends only on its own seed.
"""

from __future__ import annotations

from dataclasses import replace

import PIL.Image
import torch
import torch.nn.functional as F

from . import images, stages, stages_xl
from .runtime import guards
from .sampling import latents as latent_ops, schedulers
from .sampling.loop import denoise

def target_size(settings, multiple: int) -> tuple[int, int]:
    """The (height, width) the hires pass draws at: `hires_height`/`hires_width`, else the base size times the
    scale, rounded down to a multiple of the VAE factor."""
    s = settings
    height = s.hires_height or int(s.height * s.hires_scale) // multiple * multiple
    width = s.hires_width or int(s.width * s.hires_scale) // multiple * multiple
    return height, width


def upscale(pipe, latents: torch.Tensor, upscaler, height: int, width: int, generator) -> torch.Tensor:
    """The base pass's (B, C, h, w) latents as latents of the target size."""
    factor = pipe.vae_scale_factor
    if upscaler == "latent":
        return F.interpolate(latents, size=(height // factor, width // factor), mode="bilinear", antialias=False)
    pictures = images.postprocess(guards.decode_checked(pipe.vae, latents), "pil")
    resize = _model(upscaler) if upscaler != "lanczos" else None
    encoded = []
    for i, picture in enumerate(pictures):
        if resize is not None:
            picture = resize(picture)
        pixels = images.to_tensor(picture, height, width).to(pipe.device, pipe.vae.dtype)
        one = [generator[i]] if isinstance(generator, list) else generator
        encoded.append(guards.encode_checked(pipe.vae, pixels, 1, one))
    return torch.cat(encoded).to(pipe.dtype)


def _model(upscaler):
    """A PIL -> PIL upscaler: the callable given, or a model file read with spandrel."""
    if callable(upscaler):
        return upscaler
    try:
        import spandrel
    except ImportError:
        raise ImportError("`hires_upscaler`: upscaler model files are read with spandrel; pip install "
                          "'ldm-pipeline[upscalers]' (it needs torchvision)") from None
    model = spandrel.ModelLoader().load_from_file(str(upscaler)).eval()

    def run(picture: PIL.Image.Image) -> PIL.Image.Image:
        tensor = (images.to_tensor(picture, picture.height, picture.width) + 1) / 2
        with torch.no_grad():
            out = model(tensor.to(model.device, model.dtype)).clamp(0, 1)
        return images.postprocess(out.float() * 2 - 1, "pil")[0]

    return run


def refine(pipe, call: stages.Call, contexts: stages.Contexts, latents: torch.Tensor, watch) -> torch.Tensor:
    """The hires pass: upscale the base pass's (B, C, h, w) latents and denoise them again at the target size.

    Returns:
        The final (B, C, H / f, W / f) latents at the target size.
    """
    s = call.settings
    height, width = target_size(s, pipe.vae_scale_factor)
    steps = s.hires_steps or s.num_inference_steps
    scheduler = schedulers.fresh_copy(pipe.scheduler)
    scheduler.set_timesteps(steps, device=pipe.device)
    timesteps = latent_ops.img2img_timesteps(scheduler, steps, s.hires_strength)
    upscaled = upscale(pipe, latents, s.hires_upscaler, height, width, call.generator)
    if pipe.added_layout is not None:  # SDXL: the size ids of the size drawn at now
        contexts = stages_xl.at_size(pipe, s, contexts, height, width)
    start = stages.Start(scheduler, timesteps, latent_ops.img2img_start(scheduler, upscaled, timesteps[:1],
                                                                        call.generator))
    big = replace(call, settings=s.replace(height=height, width=width))
    unet = stages.model_for(pipe, big, start, contexts.cond)
    guidances = stages.guidances_for(pipe, big, contexts, start)
    hooks = stages.hooks_for(pipe, big, start, watch)
    final, _ = denoise(unet, scheduler, start.latents, timesteps, contexts.cond, guidances,
                       schedulers.step_kwargs(scheduler, call.generator, s.eta), hooks, s.progress)
    return final
