"""The stages' SDXL parts and the base-to-refiner hand-off (see `stages`, `pipeline_xl`).

- `xl_settings` (stage 1): the SDXL settings checked and made plain, refused on a one-tower model;
- `image_latents` (stage 1): `image=` given as latents, the refiner's side of a hand-off
  (`denoising_start`), checked with `denoising_end`;
- `inpaint_hand_off` (stage 1): inpainting's hand-off checked, and the picture given back outside the mask;
- `two_towers` (stage 2): both towers' contexts, each row packed with its added conditions;
- `at_size` (the hires pass): those contexts with the size ids of the larger size.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import images
from .adapters import textual_inversion
from .conditioning import sdxl
from .runtime import checks
from .settings import GenerationSettings, default as default_of
from .text import towers as towers_text

# settings only a two-tower model with added conditions (SDXL) takes
XL_ONLY = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "original_size",
           "crops_coords_top_left", "target_size", "negative_original_size", "negative_crops_coords_top_left",
           "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def xl_settings(pipe, s: GenerationSettings, prompts, count: int) -> GenerationSettings:
    """The SDXL settings made plain: the second tower's prompts and negative prompts as one per prompt (None where
    the first's are read), sizes as tuples; refused on a one-tower model."""
    xl = pipe.added_layout is not None
    if s.clip_skip:  # SDXL counts from the penultimate layer, one-tower models from the last
        layers = min(encoder.config.num_hidden_layers for _, encoder in pipe.text_towers) - (1 if xl else 0)
        if s.clip_skip > layers:
            raise ValueError(f"`clip_skip`: got {s.clip_skip}; this model's text encoder has {layers} layer(s) to skip")
    if not xl:
        if pipe.unet.config.get("addition_embed_type") == "text_time":
            raise ValueError("`unet`: takes SDXL's added conditions (pooled text and size ids), which this "
                             "pipeline does not give; use LatentDiffusionXLPipeline (from_pretrained finds it)")
        given = [name for name in XL_ONLY if _plain(getattr(s, name)) != _plain(default_of(name))]
        if given:
            raise ValueError(f"`{given[0]}`: this model has one text encoder and no added conditions; the SDXL "
                             "settings (prompt_2, pooled embeddings, sizes, aesthetic scores) need an SDXL model")
        return s.replace(crops_coords_top_left=default_of("crops_coords_top_left"))  # a recipe's list: the tuple
    if s.prompt_embeds is not None and s.pooled_prompt_embeds is None:
        raise ValueError("`pooled_prompt_embeds`: an SDXL model needs them with `prompt_embeds` (the second text "
                         "encoder's pooled projection)")
    if s.negative_prompt_embeds is not None and s.negative_pooled_prompt_embeds is None and s.guidance_scale > 1:
        raise ValueError("`negative_pooled_prompt_embeds`: an SDXL model needs them with `negative_prompt_embeds`")
    sides = []
    for name, value in (("prompt_2", s.prompt_2), ("negative_prompt_2", s.negative_prompt_2)):
        if value is None or (isinstance(value, list) and all(v is None for v in value)):
            sides.append(None)
            continue
        if prompts is None:
            raise ValueError(f"`{name}`: given with prompt embeddings; give the prompts, or embeddings alone")
        if s.prompt_composition:
            raise ValueError(f"`{name}`: composed prompts (prompt_composition) read one prompt for both towers")
        texts = [value] * count if isinstance(value, str) else value
        if not (isinstance(texts, list) and len(texts) == count and all(isinstance(t, (str, type(None)))
                                                                        for t in texts)):
            raise ValueError(f"`{name}`: got {value!r}; expected a string, or one string (or None) per prompt")
        sides.append(texts)
    sizes = {name: tuple(int(v) for v in getattr(s, name)) for name in XL_ONLY
             if name.endswith(("_size", "_top_left")) and getattr(s, name) is not None}
    return s.replace(prompt_2=sides[0], negative_prompt_2=sides[1], **sizes)


def image_latents(pipe, s: GenerationSettings, batch: int) -> torch.Tensor | None:
    """`image` given as latents (B, C, h, w) of the VAE's channels (a base's `output_type="latent"`), checked;
    None for a picture. `denoising_start` needs such latents, and `denoising_end` a whole schedule to cut."""
    given = s.image
    is_latents = isinstance(given, torch.Tensor) and given.ndim == 4 and given.shape[1] == \
        pipe.vae.config.latent_channels
    if s.denoising_start is not None and not is_latents:
        raise ValueError("`denoising_start`: goes on from latents part-way along the schedule; pass them as image= "
                         "(a base's output_type=\"latent\" images)")
    if s.denoising_start is not None and s.denoising_end is not None and s.denoising_start >= s.denoising_end:
        raise ValueError(f"`denoising_start`: {s.denoising_start} is not before `denoising_end` {s.denoising_end}")
    if s.denoising_end is not None and s.hires_fix:
        raise ValueError("`denoising_end`: stops the schedule early for a refiner; it does not go with hires_fix")
    if not is_latents:
        return None
    checks.check_tensor("image", given, 4, "latents (batch, channels, h, w)")
    if given.shape[0] not in (1, batch):
        raise ValueError(f"`image`: {given.shape[0]} latents for {batch} images; give one, or one per image")
    if s.mask_image is not None and s.denoising_start is None:
        raise ValueError("`mask_image`: given with latents as `image` but no `denoising_start`; inpainting goes on "
                         "from latents only as a base's hand-off: pass denoising_start= (the base's denoising_end), "
                         "or the picture itself as image=")
    return given.expand(batch, -1, -1, -1) if given.shape[0] == 1 else given


def inpaint_hand_off(pipe, s: GenerationSettings, from_latents: bool):
    """An inpainting hand-off checked, on both sides; returns `original_image` as RGB, the picture the latents were
    drawn from (None when not given; a 9-channel UNet needs it to go on from latents)."""
    hand_off = from_latents and s.mask_image is not None
    if s.padding_mask_crop is not None and s.mask_image is not None and (hand_off or s.denoising_end is not None):
        raise ValueError(f"`padding_mask_crop`: got {s.padding_mask_crop}; an inpainting hand-off (denoising_end, "
                         "denoising_start) draws the whole picture; expected None")
    if hand_off and s.masked_content != "original":
        raise ValueError(f"`masked_content`: got {s.masked_content!r}; going on from latents, the masked area "
                         "starts from them; expected 'original'")
    if s.original_image is None:
        if hand_off and pipe.unet.config.in_channels == 9:
            raise ValueError("`original_image`: got None; a 9-channel inpainting UNet sees the masked picture at "
                             "every step, so going on from latents it needs the picture: pass original_image=")
        return None
    if not hand_off:
        raise ValueError("`original_image`: given outside an inpainting hand-off; expected only with latents as "
                         "image=, mask_image= and denoising_start= (a picture given as image= is itself kept "
                         "outside the mask)")
    return images.load_image(s.original_image, "original_image")


def two_towers(pipe, call, prompts: list[str] | None, negatives: list[str] | None,
                guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL's contexts (`text.towers`), each row packed with its pooled projection and time ids
    (`conditioning.sdxl`): (rows * images per prompt, L + extra rows, D) for the prompts and negative prompts."""
    s = call.settings
    towers, layout = pipe.text_towers, pipe.added_layout
    rows = len(negatives) if negatives else len(call.prompts) if call.prompts else s.prompt_embeds.shape[0]

    def reads(texts, seconds):  # each tower's texts: the first reads `texts`, the second its own where given
        second = [b or a for a, b in zip(texts, seconds or [None] * len(texts))]
        sides = [texts, second][-len(towers):]
        return textual_inversion.expand_sides(towers, sides) if pipe.embeddings else sides

    negative_sides = reads(negatives or [""] * rows, call.negatives_2)
    zeros = [pipe.force_zeros_for_empty_prompt and not any(side[i] for side in negative_sides) for i in range(rows)]
    encode_negatives = guided and s.negative_prompt_embeds is None and not all(zeros)
    sides = [[*(side if prompts is not None else []), *(negative if encode_negatives else [])]
             for side, negative in zip(reads(prompts, call.prompts_2) if prompts else [[]] * len(towers),
                                       negative_sides)]
    chunks = towers_text.chunks_for(towers, sides, s.prompt_weighting) if any(sides) else 1
    length = towers[0][0].model_max_length
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        given = getattr(s, name)
        if given is not None and (given.shape[1] % length or (any(sides) and given.shape[1] != chunks * length)):
            raise ValueError(f"`{name}`: {given.shape[1]} tokens; the other side's text needs {chunks * length}; give "
                             "both embeddings, or embeddings as long as the longest prompt")
        if given is not None:
            chunks = given.shape[1] // length
    caches = pipe.embedding_caches
    if s.prompt_embeds is None:
        cond = towers_text.encode_texts(towers, reads(prompts, call.prompts_2), chunks, s.prompt_weighting,
                                        s.clip_skip, caches)
    else:
        sdxl.check_pooled(layout.pooled_dim, s.pooled_prompt_embeds, "pooled_prompt_embeds", s.prompt_embeds.shape[0])
        cond = towers_text.TowerText(s.prompt_embeds, s.pooled_prompt_embeds)
    uncond = None
    if guided and s.negative_prompt_embeds is not None:
        sdxl.check_pooled(layout.pooled_dim, s.negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", rows)
        uncond = towers_text.TowerText(s.negative_prompt_embeds, s.negative_pooled_prompt_embeds)
    elif encode_negatives:
        uncond = towers_text.zero_rows(towers_text.encode_texts(towers, negative_sides, chunks, s.prompt_weighting,
                                                                s.clip_skip, caches), zeros)
    elif guided:  # every negative prompt empty: zeros (force_zeros_for_empty_prompt), nothing to encode
        uncond = towers_text.TowerText(cond.context.new_zeros((rows, *cond.context.shape[1:])),
                                       cond.pooled.new_zeros((rows, cond.pooled.shape[1])))
    positive, negative = sdxl.time_ids(s, s.height, s.width, pipe.requires_aesthetics_score)

    def packed(text: towers_text.TowerText, ids: list[float]) -> torch.Tensor:
        context, pooled = text.context.to(pipe.device, pipe.dtype), text.pooled.to(pipe.device, pipe.dtype)
        ids = torch.tensor([ids], dtype=pipe.dtype, device=pipe.device).expand(context.shape[0], -1)
        return layout.pack(context, pooled, ids).repeat_interleave(s.num_images_per_prompt, dim=0)

    return packed(cond, positive), (packed(uncond, negative) if uncond is not None else None)


def at_size(pipe, s: GenerationSettings, contexts, height: int, width: int):
    """The packed contexts with the time ids of a call drawn at (height, width): the hires pass conditions on
    the size it draws at (`original_size` and `target_size`, when not given, are that size)."""
    layout = pipe.added_layout
    positive, negative = sdxl.time_ids(s, height, width, pipe.requires_aesthetics_score)

    def repacked(packed: torch.Tensor | None, ids: list[float]) -> torch.Tensor | None:
        if packed is None:
            return None
        context, pooled, _ = layout.unpack(packed)
        ids = torch.tensor([ids], dtype=packed.dtype, device=packed.device).expand(packed.shape[0], -1)
        return layout.pack(context, pooled, ids)

    return replace(contexts, cond=repacked(contexts.cond, positive), uncond=repacked(contexts.uncond, negative),
                   parts=[repacked(part, positive) for part in contexts.parts])
