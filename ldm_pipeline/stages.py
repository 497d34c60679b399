"""The stages of a pipeline call, in the order `LatentDiffusionPipeline.__call__` runs them.

1. `resolve`: the call's settings with the model's defaults filled in, every one checked
2. `encode_text`: the prompts' contexts (and each composed part's) and the negative prompts' (SDXL:
   both towers', each row carrying its added conditions: `stages_xl`)
3. `starting_latents`: noise, or the reference image noised to `strength` (inpainting: the picture
   and what is kept of it; a refiner: a base's latents, and inpainting what it keeps of them), and the
   timesteps (cut at `denoising_end`)
4. `model_for`: the UNet, or its compiled runner (a 9-channel inpainting UNet, an SDXL UNet, ControlNets:
   wrapped)
5. `guidances_for`, `hooks_for`: classifier-free or composed guidance, CLIP guidance; after each step
   the known region put back (4-channel inpainting), the non-finite watch and previews
6. the loop itself is `sampling.loop.denoise`
7. `finish`: decode, and the output with the record its recipes are made from

Each stage reads the `Call` that `resolve` returns; none changes the pipeline's components.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import PIL.Image
import torch

from . import images, masks, stages_xl
from .adapters import fast as fast_mode, lora as adapters, textual_inversion
from .conditioning import controlnet, inpaint, sdxl
from .guidance import clip as clip_guidance, composition
from .guidance.base import ClassifierFree, Guidance
from .output import PipelineOutput
from .provenance import recipes
from .runtime import checks, guards
from .sampling import latents as latent_ops, previews, schedulers
from .settings import GenerationSettings
from .text import encode as text


HIRES_UPSCALERS = ("latent", "lanczos")  # besides an upscaler model file or a callable (hires.py)


@dataclass
class Call:
    """A call's settings (defaults filled in, checked) and what follows from them."""

    settings: GenerationSettings
    prompts: list[str] | None  # None when prompt embeddings were given
    negatives: list[str] | None  # one per prompt; None for the empty prompt
    batch: int  # images to draw
    reference: PIL.Image.Image | None  # image-to-image's picture, as RGB
    seeds: list[int] | None  # one per image; None when generators were given
    generator: torch.Generator | list[torch.Generator]
    region: inpaint.Region | None = None  # inpainting: the picture, its mask and the part drawn
    controls: controlnet.Controls | None = None  # the ControlNets that steer it
    prompts_2: list[str | None] | None = None  # SDXL: the second tower's prompt per prompt (None: the prompt)
    negatives_2: list[str | None] | None = None  # ... and negative prompt (None: the negative prompt)
    image_latents: torch.Tensor | None = None  # image-to-image from latents (a base's hand-off to a refiner)


def resolve(pipe, settings: GenerationSettings) -> Call:
    """Stage 1: fill in the model's defaults, check every setting and size the call, before any model works."""
    s = settings
    steps = s.num_inference_steps if s.num_inference_steps is not None else pipe.defaults["num_inference_steps"]
    guidance = s.guidance_scale
    if guidance is None:  # a model may store its best scale for composed prompts in regions apart
        key = "regions_guidance_scale" if s.regions is not None and s.prompt_composition is True else "guidance_scale"
        guidance = pipe.defaults.get(key, pipe.defaults["guidance_scale"])
    s = s.replace(num_inference_steps=steps, guidance_scale=guidance)
    prompts = checks.prompts_of(s.prompt, s.prompt_embeds)
    num_prompts = len(prompts) if prompts is not None else s.prompt_embeds.shape[0]
    negatives = checks.negatives_of(s.negative_prompt, num_prompts, s.negative_prompt_embeds, s.prompt_embeds)
    batch = checks.batch_of(num_prompts, s.num_images_per_prompt)
    factor = pipe.vae_scale_factor
    checks.check_call(s, batch=batch, multiple=factor, latent_channels=pipe.unet.config.in_channels,
                      context_dim=pipe.unet.config.cross_attention_dim,
                      max_steps=_most_steps(pipe.scheduler))
    composition.check_composition(s.prompt_composition, prompts)
    s = s.replace(regions=composition.check_regions(s.regions, s.prompt, prompts, s.prompt_composition))
    clip_guidance.check_clip_guidance(s.clip_guidance_scale, s.clip_model, prompts, s.clip_guidance_every)
    previews.check_preview(s.preview, s.preview_every)
    s = stages_xl.xl_settings(pipe, s, prompts, num_prompts)
    image_latents = stages_xl.image_latents(pipe, s, batch)
    reference = images.load_image(s.image) if s.image is not None and image_latents is None else None
    original = stages_xl.inpaint_hand_off(pipe, s, image_latents is not None)  # the refiner's picture
    picture = reference if reference is not None else original
    mask = _mask_of(pipe, s, picture, image_latents is not None)
    controls = controlnet.controls_of(s, pipe.controlnet, pipe.unet)
    _check_hires(s, pipe, reference is not None)
    reference_size = None
    if reference is not None and not (mask is not None and s.padding_mask_crop is not None):
        reference_size = images.image_size(reference, s.height, s.width, factor)  # a crop is drawn at full size
    elif controls is not None and reference is None:  # text-to-image draws at the control picture's size
        reference_size = images.image_size(controls.pictures[0], s.height, s.width, factor)
    height, width = checks.output_size(s.height, s.width, factor, pipe.unet.config.sample_size,
                                       s.latents if image_latents is None else image_latents, reference_size)
    s = s.replace(height=height, width=width)
    guards.check_fits(pipe.vae, pipe.unet, batch, height, width, pipe.dtype, pipe.device, s.output_type != "latent")
    seeds, generator = None, s.generator
    if generator is None:
        seeds = latent_ops.seeds_for(s.seed, batch)
        generator = latent_ops.generators_for(seeds)
    work = inpaint.region(picture, mask, height, width, s.padding_mask_crop) if mask is not None else None
    return Call(settings=s, prompts=prompts, negatives=negatives, batch=batch, reference=reference, seeds=seeds,
                generator=generator, region=work, controls=controls, prompts_2=s.prompt_2,
                negatives_2=s.negative_prompt_2, image_latents=image_latents)


def _check_hires(settings, pipe, image_given: bool) -> None:
    """Refuse a hires fix that cannot run, before any model does."""
    s = settings
    if not s.hires_fix:
        return
    if image_given:
        raise ValueError("`hires_fix`: applies to text-to-image; with `image=` draw at the size you want instead")
    upscaler = s.hires_upscaler
    if not (callable(upscaler) or upscaler in HIRES_UPSCALERS or (isinstance(upscaler, (str, os.PathLike))
                                                           and Path(upscaler).is_file())):
        raise ValueError(f"`hires_upscaler`: got {upscaler!r}; expected one of {list(HIRES_UPSCALERS)}, an upscaler "
                         "model file (read with spandrel) or a callable on PIL images")
    multiple = pipe.vae_scale_factor
    for name in ("hires_width", "hires_height"):
        value = getattr(s, name)
        if value is not None and not (isinstance(value, int) and value > 0 and value % multiple == 0):
            raise ValueError(f"`{name}`: got {value!r}; expected None or a positive multiple of the VAE factor "
                             f"{multiple}")
    if s.hires_steps is not None and not (isinstance(s.hires_steps, int) and s.hires_steps >= 1):
        raise ValueError(f"`hires_steps`: got {s.hires_steps!r}; expected None (the call's steps) or an integer >= 1")
    steps = s.hires_steps or s.num_inference_steps
    if int(steps * s.hires_strength) < 1:
        raise ValueError(f"`hires_strength`: {s.hires_strength} of {steps} steps runs no step; raise hires_strength "
                         "or hires_steps")


def _most_steps(scheduler) -> int | None:
    """The most steps the scheduler can take: its training timesteps, or a distilled schedule's length (LCM)."""
    limits = [scheduler.config.get(key) for key in ("num_train_timesteps", "original_inference_steps")]
    return min((limit for limit in limits if limit), default=None)


def _mask_of(pipe, s: GenerationSettings, picture, from_latents: bool) -> PIL.Image.Image | None:
    """The binary mask of an inpaint call (None otherwise), checked against the picture and the UNet. Going on from
    latents, the picture is `original_image`; without it the mask may have any size (resized to the latents', as
    the base resized it)."""
    inpainting_unet = pipe.unet.config.in_channels == 9
    if s.mask_image is None:
        if inpainting_unet:
            raise ValueError("`mask_image`: this model's UNet is an inpainting UNet (9 input channels); pass "
                             "image= and mask_image=")
        return None
    if picture is None and not from_latents:
        raise ValueError("`mask_image`: given without `image`; pass the picture to repaint as image=")
    if not inpainting_unet and pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(f"`mask_image`: the UNet takes {pipe.unet.config.in_channels} channels; inpainting needs "
                         f"{pipe.vae.config.latent_channels} (any UNet) or 9 (an inpainting UNet)")
    return masks.load_mask(s.mask_image, picture.size if picture is not None else None,
                           "original_image" if from_latents else "image")


@dataclass
class Contexts:
    """Stage 2's text embeddings, (B, L, D) each, on the pipeline's device and dtype."""

    cond: torch.Tensor  # the prompts' (the first part's, for composed prompts)
    uncond: torch.Tensor | None  # the negative prompts'; None when unguided
    parts: list[torch.Tensor]  # the other composed parts'
    part_weights: torch.Tensor | None  # (parts, prompts) weights of composed parts


def encode_text(pipe, call: Call) -> Contexts:
    """Stage 2: the contexts the UNet is conditioned on."""
    s = call.settings
    prompts, negatives = call.prompts, call.negatives
    if pipe.embeddings and pipe.added_layout is None:  # multi-vector tokens written out (SDXL: by each tower)
        prompts, negatives = ([textual_inversion.expand(p, pipe.tokenizer) for p in texts] if texts else texts
                              for texts in (prompts, negatives))
    slots, part_weights = composition.split_prompts(prompts) if s.prompt_composition else ([prompts], None)
    guided = s.guidance_scale > 1 or len(slots) > 1  # composed parts are each guided against the negative
    negatives = composition.negatives_for(negatives, prompts, len(slots))
    if pipe.added_layout is not None:
        cond, uncond = stages_xl.two_towers(pipe, call, composition.joined(slots), negatives, guided)
    else:
        cond, uncond = text.encode_prompts(
            pipe.tokenizer, pipe.text_encoder, composition.joined(slots), negative_prompts=negatives,
            num_images_per_prompt=s.num_images_per_prompt, guided=guided, prompt_embeds=s.prompt_embeds,
            negative_prompt_embeds=s.negative_prompt_embeds, cache=pipe.embedding_cache, weighting=s.prompt_weighting,
            clip_skip=s.clip_skip)
    cond, *parts = cond.to(pipe.device, pipe.dtype).chunk(len(slots))
    uncond = uncond.to(pipe.device, pipe.dtype) if uncond is not None else None
    return Contexts(cond=cond, uncond=uncond, parts=parts, part_weights=part_weights)


@dataclass
class Start:
    """Stage 3's result: a fresh scheduler, the timesteps to run and the latents they start from."""

    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor  # (B, C, h, w), scaled for the scheduler
    known: inpaint.Known | None = None  # inpainting: what the loop keeps of the picture


def starting_latents(pipe, call: Call) -> Start:
    """Stage 3: noise; or the reference picture encoded and noised to `strength`; or, inpainting, that
    and what is kept of the picture."""
    start = _start(pipe, call)
    if call.settings.denoising_end is not None:  # a base handing off to a refiner stops part-way
        start.timesteps = latent_ops.timesteps_until(start.scheduler, start.timesteps, call.settings.denoising_end)
    if not len(start.timesteps):
        share = call.settings.denoising_start if call.settings.denoising_start is not None else \
            call.settings.denoising_end
        raise ValueError(f"`denoising_start`, `denoising_end`: {share} of {call.settings.num_inference_steps} steps "
                         "leaves no step to run; take more steps or another share")
    return start


def _start(pipe, call: Call) -> Start:
    s = call.settings
    scheduler = schedulers.fresh_copy(pipe.scheduler)
    scheduler.set_timesteps(s.num_inference_steps, device=pipe.device)
    if call.image_latents is not None:  # a base's latents: noised to `strength`, or gone on from where it stopped
        if s.denoising_start is not None:
            latents = call.image_latents.to(pipe.device, pipe.dtype)
            known = inpaint.resume(pipe, call.region, latents, call.generator) if call.region is not None else None
            return Start(scheduler, latent_ops.timesteps_from(scheduler, s.denoising_start), latents, known)
        timesteps = latent_ops.img2img_timesteps(scheduler, s.num_inference_steps, s.strength)
        return Start(scheduler, timesteps, latent_ops.img2img_start(
            scheduler, call.image_latents.to(pipe.device, pipe.dtype), timesteps[:1], call.generator))
    if call.reference is None:
        factor = pipe.vae_scale_factor
        shape = (call.batch, pipe.unet.config.in_channels, s.height // factor, s.width // factor)
        latents = s.latents
        if latents is None:
            latents = latent_ops.initial_noise(shape, call.generator, pipe.device, pipe.dtype)
        return Start(scheduler, scheduler.timesteps, latents.to(pipe.device, pipe.dtype) * scheduler.init_noise_sigma)
    timesteps = latent_ops.img2img_timesteps(scheduler, s.num_inference_steps, s.strength)
    if call.region is not None:
        latents, known = inpaint.start(pipe, call.region, call.batch, call.generator, scheduler, timesteps,
                                       s.strength, s.masked_content)
        return Start(scheduler, timesteps, latents, known)
    pixels = images.to_tensor(call.reference, s.height, s.width).to(pipe.device, pipe.vae.dtype)
    encoded = guards.encode_checked(pipe.vae, pixels, call.batch, call.generator, upcast=pipe.vae_upcast)
    return Start(scheduler, timesteps, latent_ops.img2img_start(scheduler, encoded.to(pipe.dtype), timesteps[:1],
                                                                call.generator))


def model_for(pipe, call: Call, start: Start, cond: torch.Tensor):
    """Stage 4: the UNet to call, `unet(x, t, encoder_hidden_states=context)`: compiled where it can be,
    given the mask and masked picture when it is a 9-channel inpainting UNet, and the ControlNets' residuals."""
    # a compiled package holds no unfused LoRA layers and takes no ControlNet residuals
    compiled = pipe.compiled and not adapters.unfused(pipe) and call.controls is None
    sample_shape = (pipe.unet.config.in_channels, *start.latents.shape[2:])
    layout = pipe.added_layout  # SDXL: the contexts carry the added conditions (conditioning.sdxl)
    context_shape = layout.context_shape(cond.shape[1:]) if layout is not None else cond.shape[1:]
    added = (layout.pooled_dim, layout.time_dim) if layout is not None else None
    unet = pipe.compiled.runner_for(pipe.unet, sample_shape, context_shape, added) if compiled else pipe.unet
    if layout is not None:
        unet = sdxl.AddedConditionsUNet(unet, layout)
    if start.known is not None and start.known.masked_latents is not None:
        unet = inpaint.InpaintUNet(unet, start.known)
    if call.controls is not None:  # the nets see the 4-channel latents, as in diffusers' ControlNet inpainting
        c, s = call.controls, call.settings
        units = controlnet.units(c.nets, c.pictures, c.scales, c.starts, c.ends, call.batch, s.height, s.width,
                                 pipe.device)
        if layout is not None:  # an SDXL net takes the added conditions off the packed contexts, as the UNet does
            units = [replace(unit, net=sdxl.AddedConditionsUNet(unit.net, layout)) for unit in units]
        unet = controlnet.ControlledUNet(unet, units, len(start.timesteps), c.guess_mode)
    return unet


def guidances_for(pipe, call: Call, contexts: Contexts, start: Start) -> list[Guidance]:
    """Stage 5: how each step is steered, in order."""
    s = call.settings
    if contexts.parts:  # composed prompts (uncond is always encoded for them)
        weights = contexts.part_weights
        if s.regions is not None:
            weights = composition.region_weights(weights, s.regions, *start.latents.shape[-2:])
        guidances = [composition.Composed(contexts.uncond, contexts.parts,
                                          weights.repeat_interleave(s.num_images_per_prompt, dim=1),
                                          s.guidance_scale)]
    else:
        guidances = [ClassifierFree(contexts.uncond, s.guidance_scale)] if contexts.uncond is not None else []
    if s.clip_guidance_scale > 0:
        texts = [p for p in call.prompts for _ in range(s.num_images_per_prompt)]
        guidances.append(clip_guidance.ClipGuidance(clip_guidance.clip_for(s.clip_model, pipe.device), pipe.vae,
                                                    texts, s.clip_guidance_scale, s.clip_guidance_every))
    return guidances


def hooks_for(pipe, call: Call, start: Start, watch: guards.StepWatch) -> list:
    """What runs after each step, in order: the known region put back (4-channel inpainting), the
    non-finite watch (which also calls the user's callback) and previews."""
    s = call.settings
    keep = []
    if start.known is not None and start.known.masked_latents is None:
        keep = [inpaint.KeepKnown(start.known, start.scheduler, start.timesteps)]
    return [*keep, watch, *previews.hooks_for(pipe.vae, s.preview, s.preview_every, len(start.timesteps))]


def finish(pipe, call: Call, final: torch.Tensor, scheduler, steps_run: int,
           guidances: list[Guidance]) -> PipelineOutput:
    """Stage 7: decode the final latents (unless latents were asked for) and record the call for its recipes.

    The recipe keeps the call's settings (the base size with a hires fix); the output says the drawn size."""
    s = call.settings
    height, width = s.height, s.width
    if s.hires_fix and call.region is None:
        height, width = final.shape[-2] * pipe.vae_scale_factor, final.shape[-1] * pipe.vae_scale_factor
    if s.output_type == "latent":
        result = final
    elif call.region is not None:  # the drawn pixels pasted back into the picture
        drawn = images.postprocess(guards.decode_checked(pipe.vae, final, upcast=pipe.vae_upcast), "np")
        result = images.from_unit_array(inpaint.paste_back(call.region, drawn, s.mask_blur), s.output_type)
    else:
        result = images.postprocess(guards.decode_checked(pipe.vae, final, upcast=pipe.vae_upcast), s.output_type)
    if pipe.offload:
        pipe.offload.offload_all()  # the GPU is free between calls
    extra = {**clip_guidance.recipe_of(guidances), **adapters.recipe_of(pipe), **textual_inversion.recipe_of(pipe),
             **fast_mode.recipe_of(pipe)}
    if call.controls is not None:
        extra["controlnets"] = controlnet.record(call.controls, s.control_image)
    record = recipes.CallRecord.of(pipe, call, scheduler, extra=extra)
    return PipelineOutput(
        images=result, seeds=call.seeds, height=height, width=width, num_inference_steps=s.num_inference_steps,
        steps_run=steps_run, scheduler=schedulers.scheduler_name(scheduler), guidance_scale=s.guidance_scale,
        strength=s.strength if call.reference is not None or call.image_latents is not None else None,
        prompts=call.prompts, call=record)
