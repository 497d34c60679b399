"""`LatentDiffusionPipeline`: the object users hold. It composes the functions of text, latents,
sampling and images; the maths lives in those modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import hires, images, stages
from .adapters import fast as fast_mode, lora as adapters, textual_inversion
from .fast import compile as fast
from .loading import folders as loading, single_file, xl_folders
from .output import PipelineOutput
from .provenance import reproduce
from .provenance.hashes import ModelIdentity
from .runtime import checks, guards, memory
from .sampling import latents as latent_ops, previews, schedulers
from .sampling.loop import StepCallback, denoise
from .settings import GenerationSettings
from .text import encode as text

DEFAULT_MODEL = Path(__file__).parent / "models" / "shapes"
FALLBACK_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, where it is twice as fast and halves memory; fp32 elsewhere (CPU fp16 is slow)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class LatentDiffusionPipeline(memory.MemoryMethods, fast_mode.FastMethods, adapters.AdapterMethods,
                              textual_inversion.TextualInversionMethods):
    """Text-to-image and image-to-image with a CLIP text encoder, a VAE and a conditional UNet.

    Args:
        tokenizer: a transformers CLIP tokenizer.
        text_encoder: a transformers `CLIPTextModel`.
        vae: a diffusers `AutoencoderKL`.
        unet: a diffusers `UNet2DConditionModel` with cross-attention.
        scheduler: any diffusers scheduler; it is copied for each call, never changed.
        defaults: generation defaults ("guidance_scale", "num_inference_steps") that a model
            folder may carry; unspecified ones are diffusers' (7.5 and 50).
        controlnet: a diffusers `ControlNetModel` (or a list) that calls use unless they pass their
            own, so that a served pipeline keeps one loaded.
    """

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler, defaults: dict | None = None,
                 controlnet=None):
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)
        loading.check_components(components)
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = components.values()
        self._init_state(defaults, controlnet)

    def _init_state(self, defaults: dict | None, controlnet) -> None:
        """What a pipeline keeps besides its components (shared with `LatentDiffusionXLPipeline`)."""
        self.defaults = {**self.FALLBACK_DEFAULTS, **(defaults or {})}
        self.compiled: fast.CompiledUNet | None = None  # set by compile()
        self.embedding_cache = text.EmbeddingCache()  # repeated prompts and "" are encoded once
        self.identity = ModelIdentity()  # the model's name and hash, for recipes
        self.offload: memory.ModelOffload | None = None  # the memory helpers' state (memory.MemoryMethods)
        self._attention_processors: dict | None = None
        self.loras, self.active_loras, self.fused_scale = {}, [], 1.0  # LoRA adapters (adapters.AdapterMethods)
        self.controlnet = controlnet  # a ControlNetModel (or a list) every call uses unless it passes its own
        self.embeddings: dict[str, dict] = {}  # textual-inversion tokens loaded (TextualInversionMethods)

    # -- components -------------------------------------------------------------------------

    @property
    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, unet=self.unet,
                    scheduler=self.scheduler)

    FALLBACK_DEFAULTS = FALLBACK_DEFAULTS
    added_layout = None  # SDXL models: how the added conditions ride on the contexts (conditioning.sdxl.Layout)
    vae_upcast = False  # SDXL models: an fp16 VAE decodes in fp32 (its config's `force_upcast`)

    @property
    def named_models(self) -> list[tuple[str, torch.nn.Module]]:
        """The models with weights, by component name (what the model hash covers, in its order)."""
        return [("text_encoder", self.text_encoder), ("vae", self.vae), ("unet", self.unet)]

    @property
    def text_towers(self) -> list[tuple]:
        """(tokenizer, text encoder) of each text tower: one here, two for SDXL."""
        return [(self.tokenizer, self.text_encoder)]

    # Read off the first weight: diffusers' `unet.device`/`unet.dtype` walk every module (2 ms a call).
    @property
    def device(self) -> torch.device:
        return self.offload.device if self.offload else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return latent_ops.vae_scale_factor(self.vae)

    def clear_embedding_caches(self) -> None:
        """Forget the cached prompt embeddings (a LoRA's scale changes them, and no weight shows it)."""
        self.embedding_cache.clear()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move the models; with no dtype, fp16 on CUDA and fp32 elsewhere. Returns self."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or default_dtype(device)
        self.disable_model_cpu_offload()
        for _, model in self.named_models:
            if model.dtype != dtype:  # a same-dtype cast is a no-op, but diffusers warns about it
                model.to(dtype=dtype)
            model.to(device=device)
        return self

    def set_scheduler(self, name: str):
        """Switch to a named scheduler (see `schedulers.SCHEDULERS`), keeping the model's config. Returns self."""
        self.scheduler = schedulers.make_scheduler(name, self.scheduler.config)
        return self

    def compile(self, mode: str | None = None, cache_dir: str | os.PathLike | None = None, height: int | None = None,
                width: int | None = None, batch: int | None = 2, verbose: bool = True):
        """Run the UNet compiled: about twice as fast on the bundled model, same pixels. Returns self.

        Args:
            mode: "aot" (the default on the CPU): an AOTInductor package per model, latent size,
                dtype, device and machine, built once (about a minute for the bundled model) and
                loaded from the disk cache in under a second by later processes. A `torch.compile`
                mode compiles in this process instead: "reduce-overhead" (CUDA graphs; the default
                on a GPU, 4x diffusers' speed for SD 1.5 at 512 px on an H100), "default", "max-autotune", ...
            cache_dir: where packages go; default `$LDM_CACHE_DIR/compiled` or
                `~/.cache/ldm_pipeline/compiled`.
            height, width, batch: the image size and UNet batch to compile for now (default:
                the model's size, batch 2 = one image with guidance; None builds nothing now);
                other sizes and batches compile when first drawn. Weights, device or dtype that
                change later are noticed before each call and compiled for.
        """
        checks.check_size(height, width, self.vae_scale_factor)
        if batch is not None and (not checks.is_int(batch) or batch < 1):
            raise ValueError(f"`batch`: got {batch!r}; expected an integer >= 1 (the UNet's batch) or None")
        self.compiled = fast.compile_unet(self.unet, mode or fast.default_mode(self.device), cache_dir, verbose,
                                          batch, height, width, self.vae_scale_factor,
                                          self.text_towers[0][0].model_max_length,
                                          (self.added_layout.pooled_dim, self.added_layout.time_dim)
                                          if self.added_layout is not None else None)
        return self

    def model_hash(self) -> str:
        """The model's hash as recipes record it (see `model_hash.ModelIdentity`); cached until the weights change."""
        return self.identity.hash(self)

    def reproduce(self, source, image: images.ImageInput | None = None, ignore_model_hash: bool = False,
                  progress: bool = True, mask_image: images.ImageInput | None = None, controlnet=None,
                  control_image=None) -> PipelineOutput:
        """Draw an image again from its recipe: the same pixels on the same machine and software.

        Args:
            source: a PNG written by `PipelineOutput.save` or `ldm generate` (a grid: all its
                images), an A1111-style PNG, or a `Recipe` (or a list of them from one call).
            image: image-to-image: the reference picture (default: the file the recipe names,
                if it is still there); refused when its pixels are not the recorded ones.
            ignore_model_hash: draw even when this model's hash differs from the recipe's.
            mask_image: inpainting: the mask (default: the file the recipe names); refused when it is
                not the recorded one.
            controlnet, control_image: the recipe's ControlNets (default: the pipeline's own) and their
                pictures (default: the files the recipe names); refused when not the recorded ones.
        """
        return reproduce.reproduce(self, source, image=image, ignore_model_hash=ignore_model_hash,
                                   progress=progress, mask_image=mask_image, controlnet=controlnet,
                                   control_image=control_image)

    # -- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        allow_pickle: bool = False) -> "LatentDiffusionPipeline":
        """Load a diffusers model folder, local or from the Hub; with no argument, the bundled model.

        An SDXL folder (base or refiner) gives a `LatentDiffusionXLPipeline`.

        Args:
            path_or_id: a local folder or a Hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5".
            torch_dtype: defaults to fp16 on CUDA and fp32 on CPU.
            device: where to run; defaults to the CPU.
            allow_pickle: load components whose only weights are pickled (.bin), with
                `torch.load(weights_only=True)`; refused by default (`loading.ModelFileError`).
        """
        if path_or_id is None:
            if not (DEFAULT_MODEL / "model_index.json").is_file():
                raise loading.ModelNotFoundError(
                    f"the bundled model is not installed at {str(DEFAULT_MODEL)!r}; pass a model folder or Hub id"
                )
            path_or_id = DEFAULT_MODEL
        device = torch.device(device or "cpu")
        folder = loading.resolve_model_dir(path_or_id)
        if xl_folders.is_xl_folder(folder):  # SDXL (base or refiner): the two-tower sibling class
            from .pipeline_xl import LatentDiffusionXLPipeline

            return LatentDiffusionXLPipeline.from_pretrained(path_or_id, torch_dtype, device, allow_pickle)
        components = loading.load_components(folder, torch_dtype=torch_dtype or default_dtype(device),
                                             allow_pickle=allow_pickle)
        pipe = cls(**components, defaults=fast_mode.model_fast_lora(folder, loading.read_defaults(folder)))
        pipe.identity.name = Path(path_or_id).resolve().name if Path(path_or_id).is_dir() else str(path_or_id)
        return pipe.to(device, torch_dtype)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | None = None, tokenizer=None,
                         torch_dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None,
                         allow_pickle: bool = False) -> "LatentDiffusionPipeline":
        """Load an original single-file Stable Diffusion checkpoint (.safetensors; .ckpt/.pt with `allow_pickle`).

        Args:
            config: "sd15", "sd21" or a diffusers folder of configs; guessed from the weights when None.
            tokenizer: by default OpenAI's CLIP tokenizer shipped in configs/ (offline), with the
                config's special tokens; or a tokenizer, a tokenizer folder or a Hub id.
            allow_pickle: accept a pickled .ckpt/.pt file, read with `torch.load(weights_only=True)`.
        """
        device = torch.device(device or "cpu")
        components = single_file.load_single_file(path, config=config, tokenizer=tokenizer,
                                                  torch_dtype=torch_dtype or default_dtype(device), allow_pickle=allow_pickle)
        pipe = cls(**components).to(device, torch_dtype)
        pipe.identity.loaded_from_file(path, pipe)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the diffusers folder layout (safetensors), loadable by diffusers' StableDiffusionPipeline too."""
        return loading.save_components(self.components, save_directory, defaults=self._saved_defaults())

    def _saved_defaults(self) -> dict:
        """The defaults a saved folder keeps (those not the fallbacks); refused in fast mode (its LoRA is fused)."""
        if self.fast:
            raise ValueError("save_pretrained: fast mode is on, so its LoRA is fused into the weights; "
                             "disable_fast() first")
        return {k: v for k, v in self.defaults.items() if self.FALLBACK_DEFAULTS.get(k) != v}

    # -- generation -------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], prompt_weighting: bool = False,
                      clip_skip: int | None = None) -> torch.Tensor:
        """CLIP embeddings (B, L, D) of prompts, for `prompt_embeds=` / `negative_prompt_embeds=`.

        L is 77 times the windows the longest prompt needs (see `text.windows`)."""
        prompts = checks.prompts_of(prompt, None)
        return text.encode_windows(self.tokenizer, self.text_encoder, prompts, None, prompt_weighting, clip_skip)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image: images.ImageInput | None = None,
        strength: float = 0.8,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        progress: bool = True,
        eta: float = 0.0,
        prompt_weighting: bool = False,
        prompt_composition: bool = False,
        regions: list | None = None,
        clip_guidance_scale: float = 0.0,
        clip_model=None,
        clip_guidance_every: int = 1,
        preview: previews.PreviewCallback | None = None,
        preview_every: int = previews.DEFAULT_EVERY,
        mask_image: images.ImageInput | None = None,
        mask_blur: int = 4,
        padding_mask_crop: int | None = None,
        masked_content: str = "original",
        original_image: images.ImageInput | None = None,
        controlnet=None,
        control_image: images.ImageInput | list | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        hires_fix: bool = False,
        hires_scale: float = 2.0,
        hires_width: int | None = None,
        hires_height: int | None = None,
        hires_upscaler="latent",
        hires_steps: int | None = None,
        hires_strength: float = 0.7,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        denoising_end: float | None = None,
        denoising_start: float | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> PipelineOutput:
        """Draw images for prompts; with `image=`, start from that picture (image-to-image).

        Argument names and meanings follow diffusers' StableDiffusionPipeline; each is a field of
        `GenerationSettings`, which checks it and says how recipes keep it. `seed=S` draws
        image i from seed S + i (or from the i-th seed of a list), so an image depends only on
        its seed; `generator=` behaves exactly as in diffusers. `strength` (image-to-image only)
        runs `int(num_inference_steps * strength)` steps. `callback(step, timestep, latents)`
        may return False to stop early. Prompts longer than the text encoder's 77 tokens are read in
        75-token windows; `prompt_weighting=True` reads `(word:1.3)` weights (see `text.windows`), and
        `prompt_composition=True` reads `A AND B :0.5` as composed prompts, and `regions` gives each
        part a (left, top, right, bottom) box of the image to guide (see `guidance.composition`).
        `clip_guidance_scale > 0` steers every `clip_guidance_every`-th step up a CLIP's gradient
        (`clip_model`: default the bundled shapes CLIP; see `guidance.clip`). `preview(images)` receives
        a cheap picture of the predicted clean image every `preview_every` steps (see `sampling.previews`).
        With `mask_image=` (white: repaint) the call inpaints `image`: only the masked part is drawn
        (by any UNet, or a 9-channel inpainting UNet), and the result is pasted over the picture through
        the mask blurred by `mask_blur` pixels, so the rest comes back exactly as given;
        `padding_mask_crop` draws only a crop around the mask at full size, and `masked_content` is what
        the masked area starts from (see `conditioning.inpaint`, `masks.outpaint` to extend a canvas).
        `controlnet=` (a diffusers `ControlNetModel` or a list; default the pipeline's own) steers by
        `control_image` (one per net), each net weighted by `controlnet_conditioning_scale` while the
        step lies in its [`control_guidance_start`, `control_guidance_end`] share of the schedule;
        `guess_mode` runs the nets on the prompt's copy only (see `conditioning.controlnet`).
        `hires_fix=True` draws at the base size, upscales by `hires_scale` (or to `hires_width` x
        `hires_height`) with `hires_upscaler` ("latent", "lanczos", a model file or a callable) and
        refines with `hires_strength` of `hires_steps` (see `hires`). `clip_skip=N` reads the prompt N layers
        before the text encoder's last. `denoising_end` stops at that share of the schedule (with
        `output_type="latent"`, the latents a refiner goes on from); `denoising_start` goes on from there, `image`
        being those latents; inpainting hands off the same way, the second call taking `mask_image` again and the
        picture as `original_image` to give it back outside the mask. The SDXL settings (`prompt_2`,
        `negative_prompt_2`, pooled embeddings, the size and aesthetic conditions) are `LatentDiffusionXLPipeline`'s;
        a one-tower model refuses them.

        Returns:
            `PipelineOutput` with `.images` (PIL list, np (B, H, W, 3), pt (B, 3, H, W) or
            the (B, C, h, w) latents for "latent") and the seeds, size and steps used.
        """
        # 1. settings: the model's defaults filled in, every argument checked before any model works
        call = stages.resolve(self, GenerationSettings(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
            generator=generator, seed=seed, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, image=image, strength=strength, output_type=output_type,
            callback=callback, progress=progress, eta=eta, prompt_weighting=prompt_weighting,
            prompt_composition=prompt_composition, regions=regions, clip_guidance_scale=clip_guidance_scale,
            clip_model=clip_model, clip_guidance_every=clip_guidance_every, preview=preview,
            preview_every=preview_every, mask_image=mask_image, mask_blur=mask_blur,
            padding_mask_crop=padding_mask_crop, masked_content=masked_content, original_image=original_image,
            controlnet=controlnet, control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
            guess_mode=guess_mode, hires_fix=hires_fix, hires_scale=hires_scale, hires_width=hires_width,
            hires_height=hires_height, hires_upscaler=hires_upscaler, hires_steps=hires_steps,
            hires_strength=hires_strength, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip, denoising_end=denoising_end, denoising_start=denoising_start,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score))
        # 2. text: the prompts' contexts (one per composed part) and the negative prompts'
        contexts = stages.encode_text(self, call)
        # 3. starting latents: noise, or the reference picture noised to `strength` (inpainting: and the mask)
        start = stages.starting_latents(self, call)
        # 4. the model: the UNet, compiled where it can be, wrapped for a 9-channel inpainting UNet
        unet = stages.model_for(self, call, start, contexts.cond)
        # 5. guidances and per-step hooks
        guidances = stages.guidances_for(self, call, contexts, start)
        watch = guards.StepWatch(call.settings.callback)  # notes where NaN or infinity first appear
        hooks = stages.hooks_for(self, call, start, watch)
        # 6. denoise
        step_kwargs = schedulers.step_kwargs(start.scheduler, call.generator, call.settings.eta)
        final, steps_run = denoise(unet, start.scheduler, start.latents, start.timesteps, contexts.cond, guidances,
                                   step_kwargs, hooks, call.settings.progress)
        if call.settings.hires_fix and steps_run == len(start.timesteps):  # 6b. hires fix, unless stopped
            final = hires.refine(self, call, contexts, final, watch)
        guards.check_latents(final, watch, steps_run)
        # 7. finish: decode (inpainting: paste back into the picture), and keep what the recipes are made of
        return stages.finish(self, call, final, start.scheduler, steps_run, guidances)
