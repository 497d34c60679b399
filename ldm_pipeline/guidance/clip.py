"""CLIP guidance: steer each step's predicted clean image up the gradient of its CLIP similarity
with the prompt (the classifier guidance of Dhariwal & Nichol 2021, with CLIP as the classifier,
as in CLIP-guided diffusion), a `sampling.Guidance` beside classifier-free guidance.

At each guided step the predicted clean latents x_0 are decoded through the VAE, embedded by the
CLIP's vision tower (resized and normalised differentiably) and compared with the prompt's CLIP
text embedding; x_0 moves along the gradient of the cosine similarity and the model output is
rewritten to point at the moved x_0 (`StepState.prediction_for`), so any scheduler can step
with it. The UNet is not differentiated: the step costs one VAE decode and one CLIP image pass,
forward and backward.

The gradient is scaled to unit root-mean-square per image and by sqrt(1 - alpha-bar): `scale`
is how far x_0 moves, in latent units, at full noise, shrinking as the image settles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from ..runtime.checks import finite_number, is_int
from .clip_model import SHAPES_CLIP, Clip, Preprocess
from ..sampling.loop import StepState
from .base import Guidance


def image_features(clip: Clip, pixels: torch.Tensor) -> torch.Tensor:
    """Differentiable projected CLIP image embeddings (B, P) of decoded pixels (B, 3, H, W) in [-1, 1]."""
    size = clip.preprocess.size
    pixels = (pixels.float() + 1) / 2
    if pixels.shape[-2:] != (size, size):
        side = min(pixels.shape[-2:])
        top, left = (pixels.shape[-2] - side) // 2, (pixels.shape[-1] - side) // 2
        pixels = pixels[..., top:top + side, left:left + side]  # centre crop, as `Clip.pixels` does
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(clip.preprocess.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.preprocess.std, device=pixels.device).view(1, 3, 1, 1)
    model = clip.model
    output = model.get_image_features(pixel_values=((pixels - mean) / std).to(model.dtype))
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).float()


class ClipGuidance(Guidance):
    """Move each step's predicted x_0 towards a higher CLIP similarity with its prompt.

    Args:
        clip: a `clip_model.Clip` (the bundled shapes CLIP or any transformers CLIPModel).
        vae: the pipeline's VAE, to decode x_0.
        prompts: one text per image of the batch.
        scale: step length in latent units at full noise (see the module docstring); > 0.
        every: guide every `every`-th step only (the others cost nothing extra).
    """

    contexts = ()

    def __init__(self, clip: Clip, vae, prompts: list[str], scale: float, every: int = 1):
        self.clip, self.vae, self.scale, self.every = clip, vae, float(scale), every
        self.vae_dtype = next(vae.parameters()).dtype
        text = clip.text_embeddings(prompts).to(clip.device)
        self.text = F.normalize(text, dim=-1)
        self.similarities: list[torch.Tensor] = []  # mean cosine similarity at each guided step, for reports

    def recipe(self) -> dict:
        """What an image's recipe records of this guidance (`recipes.Recipe` fields)."""
        return {"clip_guidance_scale": self.scale, "clip_guidance_every": self.every, "clip_model": self.clip.name}

    def __call__(self, prediction: torch.Tensor, outputs, state: StepState) -> torch.Tensor:
        if state.step % self.every:
            return prediction
        x0 = state.denoised(prediction).detach()
        with torch.enable_grad():
            x0.requires_grad_(True)
            pixels = self.vae.decode(x0.to(self.vae_dtype) / self.vae.config.scaling_factor).sample
            features = F.normalize(image_features(self.clip, pixels.to(self.clip.device)), dim=-1)
            similarity = (features * self.text).sum(dim=-1)
            (gradient,) = torch.autograd.grad(similarity.sum(), x0)
        self.similarities.append(similarity.detach().mean().cpu())
        rms = gradient.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
        moved = x0.detach() + self.scale * (1 - state.alpha_bar).sqrt() * gradient / rms
        return state.prediction_for(moved).to(prediction.dtype)


_loaded: dict[tuple[str, str], Clip] = {}  # CLIP folders already loaded in this process, per device


def clip_for(clip_model, device: torch.device) -> Clip:
    """The CLIP that `clip_model=` names: None (the bundled shapes CLIP), a `Clip`, a transformers
    `CLIPModel` (its tokenizer is read from where it was loaded), or a folder / Hub id; loaded once."""
    if isinstance(clip_model, Clip):
        return clip_model
    if isinstance(clip_model, CLIPModel):
        source = clip_model.name_or_path
        try:
            tokenizer = CLIPTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"`clip_model`: a CLIPModel loaded from {source!r}, whose tokenizer cannot be read "
                             f"there ({error}); pass a `ldm_pipeline.Clip(model, tokenizer, preprocess)`") from None
        return Clip(clip_model, tokenizer, Preprocess(clip_model.config.vision_config.image_size), source)
    key = (str(SHAPES_CLIP if clip_model is None else clip_model), str(device))
    if key not in _loaded:
        _loaded[key] = Clip.from_pretrained(clip_model, device=str(device))
    return _loaded[key]


def check_clip_guidance(scale, clip_model, prompts: list[str] | None, every) -> None:
    """Refuse bad CLIP-guidance arguments before any work."""
    value = finite_number("clip_guidance_scale", scale, "a number >= 0 (0 turns CLIP guidance off)")
    if value < 0:
        raise ValueError(f"`clip_guidance_scale`: got {scale!r}; expected a number >= 0 (0 turns CLIP guidance off)")
    if not is_int(every) or every < 1:
        raise ValueError(f"`clip_guidance_every`: got {every!r}; expected an integer >= 1")
    if clip_model is not None and not isinstance(clip_model, (Clip, CLIPModel, str, os.PathLike)):
        raise TypeError(f"`clip_model`: got {type(clip_model).__name__}; expected None (the bundled shapes CLIP), "
                        "a ldm_pipeline.Clip, a transformers CLIPModel, or a CLIP folder or Hub id")
    if value > 0 and prompts is None:
        raise ValueError("`clip_guidance_scale`: CLIP guidance compares images with the prompt's text; "
                         "it needs `prompt`, not only `prompt_embeds`")


def recipe_of(guidances) -> dict:
    """The recipe fields of a call's guidances (classifier-free guidance is recorded as guidance_scale)."""
    return {key: value for g in guidances if hasattr(g, "recipe") for key, value in g.recipe().items()}
