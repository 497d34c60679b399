"""`LatentDiffusionXLPipeline`: Stable Diffusion XL (a base, or a refiner) on the same stages and loop.

It is `LatentDiffusionPipeline` with two differences, both in the stages (`stages_xl`):
- the text stage reads two CLIP towers and joins their contexts (`text.towers`);
- the model wrapper gives the UNet (and each ControlNet) its added conditions, the pooled projection and
  the size (or, for a refiner, aesthetic) ids, one set per guidance copy (`conditioning.sdxl`).
Everything else, the call's settings, image-to-image, inpainting with a 4- or 9-channel UNet, guidance,
ControlNets, previews, recipes and `reproduce`, is the shared code. The call takes diffusers' SDXL arguments
(`prompt_2`, `negative_prompt_2`, `pooled_prompt_embeds`, `original_size`, `crops_coords_top_left`,
`target_size` and their negatives, `aesthetic_score`, `negative_aesthetic_score`, `denoising_end`,
`denoising_start`, `clip_skip`) and draws diffusers' `StableDiffusionXLPipeline` pixels (with `image=`,
`StableDiffusionXLImg2ImgPipeline`'s) for the same seeds.

A base hands off to a refiner as in diffusers:

    latents = base(prompt, seed=1, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, seed=1, image=latents, denoising_start=0.8).images[0]

Inpainting hands off the same way: the refiner takes the base's latents, `mask_image` again and the picture as
`original_image`, which it gives back outside the mask (`conditioning.inpaint.resume`).

SDXL's VAE overflows in fp16: with `force_upcast` in its config, an fp16 VAE encodes and decodes in fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapters import fast as fast_mode, textual_inversion
from .conditioning import sdxl
from .loading import folders as loading, xl_folders
from .pipeline import LatentDiffusionPipeline, default_dtype
from .runtime import checks
from .text import towers
from .text.encode import EmbeddingCache

XL_DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 50}  # diffusers' SDXL pipelines'


class LatentDiffusionXLPipeline(LatentDiffusionPipeline):
    """Stable Diffusion XL: text-to-image and image-to-image with two CLIP text towers and added conditions.

    Args:
        tokenizer, text_encoder: the first tower (a `CLIPTextModel`); None for a refiner, which reads the
            second tower only.
        tokenizer_2, text_encoder_2: the second tower, a transformers `CLIPTextModelWithProjection`.
        vae, unet, scheduler: as for `LatentDiffusionPipeline`; the UNet takes added text and time
            conditions (`addition_embed_type="text_time"`).
        force_zeros_for_empty_prompt: an empty negative prompt is zeros, not an encoding (SDXL base).
        requires_aesthetics_score: the UNet's time ids end with an aesthetic score instead of the target
            size (SDXL refiner).
        defaults: generation defaults the folder may carry; unspecified ones are diffusers' (5.0 and 50).
        controlnet: an SDXL `ControlNetModel` (or a list) that calls use unless they pass their own; the nets
            take the added conditions too.
    """

    FALLBACK_DEFAULTS = XL_DEFAULTS

    def __init__(self, *, tokenizer=None, text_encoder=None, tokenizer_2, text_encoder_2, vae, unet, scheduler,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False,
                 defaults: dict | None = None, controlnet=None):
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                          text_encoder_2=text_encoder_2, vae=vae, unet=unet, scheduler=scheduler)
        xl_folders.check_components(components)
        (self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2, self.vae, self.unet,
         self.scheduler) = components.values()
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        sdxl.layout_of(unet, self.requires_aesthetics_score)  # refuse a UNet without the added conditions now
        self._init_state(defaults, controlnet)
        self.embedding_caches = [EmbeddingCache() for _ in self.text_towers]  # one per tower

    # -- components -------------------------------------------------------------------------

    @property
    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, tokenizer_2=self.tokenizer_2,
                    text_encoder_2=self.text_encoder_2, vae=self.vae, unet=self.unet, scheduler=self.scheduler)

    @property
    def is_refiner(self) -> bool:
        """A refiner: the second tower only."""
        return self.text_encoder is None

    @property
    def named_models(self) -> list[tuple[str, torch.nn.Module]]:
        first = [] if self.is_refiner else [("text_encoder", self.text_encoder)]
        return [*first, ("text_encoder_2", self.text_encoder_2), ("vae", self.vae), ("unet", self.unet)]

    @property
    def text_towers(self) -> list[tuple]:
        second = (self.tokenizer_2, self.text_encoder_2)
        return [second] if self.is_refiner else [(self.tokenizer, self.text_encoder), second]

    @property
    def added_layout(self) -> sdxl.Layout:
        return sdxl.layout_of(self.unet, self.requires_aesthetics_score)

    @property
    def vae_upcast(self) -> bool:
        return bool(self.vae.config.get("force_upcast", False))

    @property
    def settings(self) -> dict:
        """The pipeline settings diffusers keeps in model_index.json."""
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                "requires_aesthetics_score": self.requires_aesthetics_score}

    def clear_embedding_caches(self) -> None:
        super().clear_embedding_caches()
        for cache in self.embedding_caches:
            cache.clear()

    # -- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        allow_pickle: bool = False) -> "LatentDiffusionXLPipeline":
        """Load an SDXL diffusers folder (base or refiner), local or from the Hub.

        Args:
            path_or_id: a folder or a Hub id such as "stabilityai/stable-diffusion-xl-base-1.0".
            torch_dtype: defaults to fp16 on CUDA and fp32 on CPU.
            device: where to run; defaults to the CPU.
            allow_pickle: load components whose only weights are pickled (.bin); see
                `LatentDiffusionPipeline.from_pretrained`.
        """
        if path_or_id is None:
            raise loading.ModelNotFoundError("`path_or_id`: no SDXL model is bundled; pass an SDXL folder or Hub id")
        device = torch.device(device or "cpu")
        folder = loading.resolve_model_dir(path_or_id)
        if not xl_folders.is_xl_folder(folder):
            raise loading.ModelNotFoundError(f"model folder {str(path_or_id)!r} is not an SDXL folder (its "
                                             "model_index.json names no text_encoder_2); load it with "
                                             "LatentDiffusionPipeline.from_pretrained")
        components, settings = xl_folders.load_xl_components(folder, torch_dtype=torch_dtype or default_dtype(device),
                                                             allow_pickle=allow_pickle)
        defaults = fast_mode.model_fast_lora(folder, loading.read_defaults(folder))
        pipe = cls(**components, **settings, defaults=defaults)
        pipe.identity.name = Path(path_or_id).resolve().name if Path(path_or_id).is_dir() else str(path_or_id)
        return pipe.to(device, torch_dtype)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | None = None, tokenizer=None,
                         torch_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                         allow_pickle: bool = False) -> "LatentDiffusionXLPipeline":
        """Load an original single-file SDXL base or refiner checkpoint (.safetensors), offline.

        Args:
            config: "sdxl" or "sdxl_refiner" (guessed from the weights when None), or a diffusers SDXL
                folder whose configs to use.
            tokenizer: unused; both towers use OpenAI's CLIP tokenizer shipped in configs/ (the second
                padding with "!", as SDXL's does).
        """
        from .loading import single_file_xl

        device = torch.device(device or "cpu")
        components, settings = single_file_xl.load_single_file_xl(
            path, config=config, torch_dtype=torch_dtype or default_dtype(device), allow_pickle=allow_pickle)
        pipe = cls(**components, **settings).to(device, torch_dtype)
        pipe.identity.loaded_from_file(path, pipe)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write diffusers' SDXL folder layout (safetensors), loadable by diffusers' SDXL pipelines too."""
        return xl_folders.save_xl_components(self.components, save_directory, self.settings,
                                            defaults=self._saved_defaults())

    # -- text -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], prompt_2: str | list[str] | None = None,
                      prompt_weighting: bool = False,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The context (B, L, D) and pooled projection (B, P) of prompts, for `prompt_embeds=` and
        `pooled_prompt_embeds=` (or their negatives). L is 77 times the windows the longest prompt needs."""
        prompts = checks.prompts_of(prompt, None)
        seconds = [prompt_2] * len(prompts) if isinstance(prompt_2, str) else prompt_2 or [None] * len(prompts)
        sides = [prompts, [b or a for a, b in zip(prompts, seconds)]][-len(self.text_towers):]
        sides = textual_inversion.expand_sides(self.text_towers, sides) if self.embeddings else sides
        chunks = towers.chunks_for(self.text_towers, sides, prompt_weighting)
        text = towers.encode_texts(self.text_towers, sides, chunks, prompt_weighting, clip_skip)
        return text.context, text.pooled
