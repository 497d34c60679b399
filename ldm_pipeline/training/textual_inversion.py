"""Teach a model a new word by textual inversion (Gal et al. 2022): one new token's embedding learns, the
rest of the model stays frozen.

The token (e.g. `<star>`) is added to the tokenizer, its embedding starts as an existing word's
(`initializer`), and only that row of the text encoder's embedding table trains, with the UNet stage's
loss (`unet.unet_loss`) on latents the model's own VAE encodes once. Captions name the new thing with
`placeholder` (e.g. "star" in `ldm shapes-data star`'s captions), which becomes the token. The result
is `learned_embeds.safetensors` in diffusers' format: `pipe.load_textual_inversion(folder)` and diffusers
read it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..files import atomic_folder
from ..text.encode import text_states
from . import data
from .loop import LoopConfig, train
from .unet import denoising_batch, encode_dataset, unet_loss


@dataclass
class TextualInversionConfig:
    """The word to learn, and on what."""

    loop: LoopConfig
    data: str = ""  # a folder with metadata.jsonl (`--data FOLDER`)
    model: str | None = None  # a folder or Hub id; None: the bundled model
    token: str = "<new>"  # the new token
    placeholder: str = ""  # the word of the captions the token replaces ("" : captions already use the token)
    initializer: str = "triangle"  # an existing word whose embedding the token starts from
    image_size: int | None = None

    def __post_init__(self):
        if not self.data:
            raise ValueError("`data`: textual inversion trains on a captioned image folder; pass --data FOLDER")
        if not isinstance(self.token, str) or not self.token.strip() or " " in self.token:
            raise ValueError(f"`token`: got {self.token!r}; expected one word such as '<star>'")


def _caption(text: str, placeholder: str, token: str) -> str:
    return re.sub(rf"\b{re.escape(placeholder)}\b", token, text) if placeholder else text


def train_textual_inversion(config: TextualInversionConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train the token's embedding, write it to `output_dir/embedding`, and return that folder."""
    from ..pipeline import LatentDiffusionPipeline

    dataset = data.open_dataset(config.data)
    pipe = LatentDiffusionPipeline.from_pretrained(config.model, torch_dtype=torch.float32)
    tokenizer, encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    if config.token in tokenizer.get_vocab():
        raise ValueError(f"`token`: {config.token!r} is already in the tokenizer's vocabulary; choose another")
    start = tokenizer(config.initializer, add_special_tokens=False).input_ids
    if len(start) != 1:
        raise ValueError(f"`initializer`: {config.initializer!r} is {len(start)} tokens; expected a word that is one")
    for model in (unet, vae, encoder):
        model.requires_grad_(False).eval()
    size = config.image_size or unet.config.sample_size * pipe.vae_scale_factor
    means, stds, captions, _ = encode_dataset(vae, dataset, len(dataset), size)
    captions = [_caption(text, config.placeholder, config.token) for text in captions]
    tokenizer.add_tokens(config.token)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    row = tokenizer.convert_tokens_to_ids(config.token)
    with torch.no_grad():
        table[row] = table[start[0]]
    table.requires_grad_(True)
    keep = torch.ones(table.shape[0], 1)
    keep[row] = 0
    table.register_hook(lambda grad: grad * (1 - keep))  # only the new token's row learns
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss_fn(models, step, generator, rank, world):
        latents, context = denoising_batch(means, stds, vae.config.scaling_factor, captions, None,
                                           lambda texts: text_states(tokenizer, models["text_encoder"], texts),
                                           config.loop, 0.0, step, generator, rank, world)
        return unet_loss(unet, scheduler, latents, context, generator), {}

    trained = train(config.loop, {"text_encoder": encoder}, loss_fn, resume=resume, progress=progress,
                    name="textual_inversion", trainable_only=True)
    vector = trained["text_encoder"].get_input_embeddings().weight[row].detach().clone()
    out = Path(config.loop.output_dir) / "embedding"
    with atomic_folder(out) as temporary:
        from safetensors.torch import save_file

        save_file({config.token: vector.contiguous()}, temporary / "learned_embeds.safetensors")
        (temporary / "training.json").write_text(json.dumps({
            "base_model": config.model or "bundled", "data": config.data, "token": config.token,
            "placeholder": config.placeholder, "initializer": config.initializer, "steps": config.loop.steps},
            indent=2))
    return out
