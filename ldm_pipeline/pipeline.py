"""`LatentDiffusionPipeline`: the object users hold. It composes the functions of text, latents,
sampling and images; the maths lives in those modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapters import lora as adapters
from .runtime import checks, guards, memory
from .guidance import composition, clip as guidance
from .fast import compile as fast
from . import images
from .sampling import latents as latent_ops, previews, schedulers
from .loading import folders as loading, single_file
from .provenance import recipes, reproduce
from .text import encode as text
from .provenance.hashes import ModelIdentity
from .output import PipelineOutput
from .guidance.base import ClassifierFree
from .sampling.loop import StepCallback, denoise

DEFAULT_MODEL = Path(__file__).parent / "models" / "shapes"
FALLBACK_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, where it is twice as fast and halves memory; fp32 elsewhere (CPU fp16 is slow)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class LatentDiffusionPipeline(memory.MemoryMethods, adapters.AdapterMethods):
    """Text-to-image and image-to-image with a CLIP text encoder, a VAE and a conditional UNet.

    Args:
        tokenizer: a transformers CLIP tokenizer.
        text_encoder: a transformers `CLIPTextModel`.
        vae: a diffusers `AutoencoderKL`.
        unet: a diffusers `UNet2DConditionModel` with cross-attention.
        scheduler: any diffusers scheduler; it is copied for each call, never changed.
        defaults: generation defaults ("guidance_scale", "num_inference_steps") that a model
            folder may carry; unspecified ones are diffusers' (7.5 and 50).
    """

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler, defaults: dict | None = None):
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)
        loading.check_components(components)
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = components.values()
        self.defaults = {**FALLBACK_DEFAULTS, **(defaults or {})}
        self.compiled: fast.CompiledUNet | None = None  # set by compile()
        self.embedding_cache = text.EmbeddingCache()  # repeated prompts and "" are encoded once
        self.identity = ModelIdentity()  # the model's name and hash, for recipes
        self.offload: memory.ModelOffload | None = None  # the memory helpers' state (memory.MemoryMethods)
        self._attention_processors: dict | None = None
        self.loras, self.active_loras, self.fused_scale = {}, [], 1.0  # LoRA adapters (adapters.AdapterMethods)

    # -- components -------------------------------------------------------------------------

    @property
    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, unet=self.unet,
                    scheduler=self.scheduler)

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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move the models; with no dtype, fp16 on CUDA and fp32 elsewhere. Returns self."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or default_dtype(device)
        self.disable_model_cpu_offload()
        for model in (self.text_encoder, self.vae, self.unet):
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
                                          batch, height, width, self.vae_scale_factor, self.tokenizer.model_max_length)
        return self

    def model_hash(self) -> str:
        """The model's hash as recipes record it (see `model_hash.ModelIdentity`); cached until the weights change."""
        return self.identity.hash(self)

    def reproduce(self, source, image: images.ImageInput | None = None, ignore_model_hash: bool = False,
                  progress: bool = True) -> PipelineOutput:
        """Draw an image again from its recipe: the same pixels on the same machine and software.

        Args:
            source: a PNG written by `PipelineOutput.save` or `ldm generate` (a grid: all its
                images), an A1111-style PNG, or a `Recipe` (or a list of them from one call).
            image: image-to-image: the reference picture (default: the file the recipe names,
                if it is still there); refused when its pixels are not the recorded ones.
            ignore_model_hash: draw even when this model's hash differs from the recipe's.
        """
        return reproduce.reproduce(self, source, image, ignore_model_hash, progress)

    # -- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        allow_pickle: bool = False) -> "LatentDiffusionPipeline":
        """Load a diffusers model folder, local or from the Hub; with no argument, the bundled model.

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
        components = loading.load_components(folder, torch_dtype=torch_dtype or default_dtype(device),
                                             allow_pickle=allow_pickle)
        pipe = cls(**components, defaults=loading.read_defaults(folder))
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
        extra = {k: v for k, v in self.defaults.items() if FALLBACK_DEFAULTS.get(k) != v}
        return loading.save_components(self.components, save_directory, defaults=extra)

    # -- generation -------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], prompt_weighting: bool = False) -> torch.Tensor:
        """CLIP embeddings (B, L, D) of prompts, for `prompt_embeds=` / `negative_prompt_embeds=`.

        L is 77 times the windows the longest prompt needs (see `prompts.py`)."""
        prompts = checks.prompts_of(prompt, None)
        return text.encode_windows(self.tokenizer, self.text_encoder, prompts, None, prompt_weighting)

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
    ) -> PipelineOutput:
        """Draw images for prompts; with `image=`, start from that picture (image-to-image).

        Argument names and meanings follow diffusers' StableDiffusionPipeline. `seed=S` draws
        image i from seed S + i (or from the i-th seed of a list), so an image depends only on
        its seed; `generator=` behaves exactly as in diffusers. `strength` (image-to-image only)
        runs `int(num_inference_steps * strength)` steps. `callback(step, timestep, latents)`
        may return False to stop early. Prompts longer than the text encoder's 77 tokens are read in
        75-token windows; `prompt_weighting=True` reads `(word:1.3)` weights (see `prompts.py`), and
        `prompt_composition=True` reads `A AND B :0.5` as composed prompts, and `regions` gives each
        part a (left, top, right, bottom) box of the image to guide (see `composition.py`).
        `clip_guidance_scale > 0` steers every `clip_guidance_every`-th step up a CLIP's gradient
        (`clip_model`: default the bundled shapes CLIP; see `guidance.py`). `preview(images)` receives
        a cheap picture of the predicted clean image every `preview_every` steps (see `previews.py`).

        Returns:
            `PipelineOutput` with `.images` (PIL list, np (B, H, W, 3), pt (B, 3, H, W) or
            the (B, C, h, w) latents for "latent") and the seeds, size and steps used.
        """
        if num_inference_steps is None:
            num_inference_steps = self.defaults["num_inference_steps"]
        if guidance_scale is None:  # a model may store its best scale for composed prompts in regions apart
            key = "regions_guidance_scale" if regions is not None and prompt_composition is True else "guidance_scale"
            guidance_scale = self.defaults.get(key, self.defaults["guidance_scale"])
        prompts = checks.prompts_of(prompt, prompt_embeds)
        num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = checks.negatives_of(negative_prompt, num_prompts, negative_prompt_embeds, prompt_embeds)
        batch = checks.batch_of(num_prompts, num_images_per_prompt)
        factor = self.vae_scale_factor
        checks.check_call(height=height, width=width, multiple=factor, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                          strength=strength, output_type=output_type, generator=generator, seed=seed,
                          latents=latents, batch=batch, image_given=image is not None, eta=eta, callback=callback,
                          prompt_weighting=prompt_weighting,
                          latent_channels=self.unet.config.in_channels, context_dim=self.unet.config.cross_attention_dim,
                          max_steps=self.scheduler.config.get("num_train_timesteps"),
                          embeds=dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds))
        composition.check_composition(prompt_composition, prompts)
        regions = composition.check_regions(regions, prompt, prompts, prompt_composition)
        guidance.check_clip_guidance(clip_guidance_scale, clip_model, prompts, clip_guidance_every)
        previews.check_preview(preview, preview_every)
        reference = images.load_image(image) if image is not None else None
        latents_given = latents is not None  # for the recipe: such images cannot be drawn again from it
        reference_size = images.image_size(reference, height, width, factor) if reference is not None else None
        height, width = checks.output_size(height, width, factor, self.unet.config.sample_size, latents,
                                           reference_size)
        guards.check_fits(self.vae, self.unet, batch, height, width, self.dtype, self.device, output_type != "latent")

        seeds = None
        if generator is None:
            seeds = latent_ops.seeds_for(seed, batch)
            generator = latent_ops.generators_for(seeds)
        slots, part_weights = composition.split_prompts(prompts) if prompt_composition else ([prompts], None)
        guided = guidance_scale > 1 or len(slots) > 1  # composed parts are each guided against the negative
        cond, uncond = text.encode_prompts(self.tokenizer, self.text_encoder, composition.joined(slots),
                                           composition.negatives_for(negatives, prompts, len(slots)),
                                           num_images_per_prompt, guided, prompt_embeds, negative_prompt_embeds,
                                           self.embedding_cache, prompt_weighting)
        cond, *others = cond.to(self.device, self.dtype).chunk(len(slots))
        uncond = uncond.to(self.device, self.dtype) if uncond is not None else None

        scheduler = schedulers.fresh_copy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        if reference is None:
            timesteps = scheduler.timesteps
            shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
            if latents is None:
                latents = latent_ops.initial_noise(shape, generator, self.device, self.dtype)
            start = latents.to(self.device, self.dtype) * scheduler.init_noise_sigma
        else:
            timesteps = latent_ops.img2img_timesteps(scheduler, num_inference_steps, strength)
            pixels = images.to_tensor(reference, height, width).to(self.device, self.vae.dtype)
            encoded = guards.encode_checked(self.vae, pixels, batch, generator)
            start = latent_ops.img2img_start(scheduler, encoded.to(self.dtype), timesteps[:1], generator)

        compiled = self.compiled and not adapters.unfused(self)  # a package holds no unfused LoRA layers
        unet = self.compiled.runner_for(self.unet, start.shape[1:], cond.shape[1:]) if compiled else self.unet
        if others:  # composed prompts (uncond is always encoded for them)
            weights = part_weights if regions is None else composition.region_weights(part_weights, regions,
                                                                                      *start.shape[-2:])
            guidances = [composition.Composed(uncond, others, weights.repeat_interleave(num_images_per_prompt, dim=1),
                                              guidance_scale, regions)]
        else:
            guidances = [ClassifierFree(uncond, guidance_scale)] if uncond is not None else []
        if clip_guidance_scale > 0:
            texts = [p for p in prompts for _ in range(num_images_per_prompt)]
            guidances.append(guidance.ClipGuidance(guidance.clip_for(clip_model, self.device), self.vae, texts,
                                                   clip_guidance_scale, clip_guidance_every))
        watch = guards.StepWatch(callback)  # notes where NaN or infinity first appear
        final, steps_run = denoise(unet, scheduler, start, timesteps, cond, guidances,
                                   schedulers.step_kwargs(scheduler, generator, eta),
                                   [watch, *previews.hooks_for(self.vae, preview, preview_every, len(timesteps))], progress)
        guards.check_latents(final, watch, steps_run)
        if output_type == "latent":
            result = final
        else:
            result = images.postprocess(guards.decode_checked(self.vae, final), output_type)
        if self.offload:
            self.offload.offload_all()  # the GPU is free between calls
        return PipelineOutput(
            images=result, seeds=seeds, height=height, width=width, num_inference_steps=num_inference_steps,
            steps_run=steps_run, scheduler=schedulers.scheduler_name(scheduler), guidance_scale=guidance_scale,
            strength=strength if reference is not None else None, prompts=prompts,
            call=recipes.CallRecord.of(self, prompts, negatives, num_images_per_prompt, scheduler, eta, reference,
                                       image, seeds is None, latents_given, prompt_embeds is not None,
                                       prompt_weighting, {**guidance.recipe_of(guidances), **adapters.recipe_of(self)}),
        )
