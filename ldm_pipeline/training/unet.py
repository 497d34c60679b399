"""Train a diffusers `UNet2DConditionModel` to denoise VAE latents, conditioned on text.

The DDPM noise-prediction loss (Ho et al. 2020, Algorithm 1) on the latents of a frozen VAE,
with cross-attention to the frozen CLIP text encoder's hidden states. A fraction of captions is
dropped to "" so the same model also predicts unconditionally (classifier-free guidance), and
an EMA of the weights is what gets exported. `edge_weight` puts more of the loss on the latent
cells that hold an outline of the image, where small objects' corners are decided.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPModel, CLIPTokenizer

from ..text.encode import encode_text
from . import data
from .loop import LoopConfig, check_stage_folder, train
from .vae import gradient_magnitude


@dataclass
class UnetConfig:
    """What to train and on what."""

    loop: LoopConfig
    clip: str = ""  # folder of the trained CLIPModel (and its tokenizer)
    vae: str = ""  # folder of the trained AutoencoderKL
    data: str = "shapes"
    max_objects: int = 2  # shapes data: scenes of up to 2 objects (the bundled model) or 3
    three_objects_prob: float | None = None  # shapes data, max_objects 3: the share of three-object scenes
    partial_captions: float = 0.0  # shapes data: chance that an object's phrase names only colour or shape
    image_size: int = 64
    cache_size: int = 20_000  # images encoded once to latents and trained on
    model: dict = field(default_factory=dict)  # diffusers UNet2DConditionModel settings
    init: str = ""  # start from this UNet (a UNet folder or a model folder with unet/) instead of new weights
    scheduler: dict = field(default_factory=dict)  # noise schedule (DDPMScheduler settings)
    caption_dropout: float = 0.1
    snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023) when set
    edge_weight: float = 0.0  # extra loss weight on latent cells that hold an outline (see `outline_weights`)
    defaults: dict = field(default_factory=dict)  # generation defaults stored with the exported model

    def __post_init__(self):
        if not (isinstance(self.edge_weight, (int, float)) and self.edge_weight >= 0):
            raise ValueError(f"`edge_weight`: got {self.edge_weight!r}; expected a number >= 0")


OUTLINE = 0.05  # a pixel gradient (vae.gradient_magnitude) above this is an outline; flat renders read 0


def outline_weights(pixels: torch.Tensor, cells: tuple[int, int], edge_weight: float) -> torch.Tensor:
    """(B, 1, *cells) loss weights on the latent grid (`cells`: its height and width) for pixels
    (B, 3, H, W): 1 + edge_weight in a cell that holds an outline of its image (a pixel gradient
    above `OUTLINE`), 1 elsewhere.

    On or off, not scaled by contrast: a purple object on the grey background, the colour nearest
    it, weighs as much as a white one. On photographs nearly every cell holds an edge, so the
    weights are nearly even there; they are meant for flat backgrounds.
    """
    outline = F.adaptive_max_pool2d(gradient_magnitude(pixels), cells) > OUTLINE
    return 1 + edge_weight * outline.float()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset, count: int, image_size: int, batch_size: int = 128,
                   edge_weight: float = 0.0):
    """Posterior means and standard deviations of the first `count` items, their captions, and with
    `edge_weight` their `outline_weights` on the latent grid (else None), from the same pixels."""
    means, stds, captions, outlines = [], [], [], []
    for start in range(0, min(count, len(dataset)), batch_size):
        pixels, texts = data.batch(dataset, list(range(start, min(start + batch_size, count, len(dataset)))),
                                   image_size)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions.extend(texts)
        if edge_weight:
            outlines.append(outline_weights(pixels, tuple(posterior.mean.shape[-2:]), edge_weight))
    return torch.cat(means), torch.cat(stds), captions, torch.cat(outlines) if outlines else None


TEXT_TABLE_BYTES = 2 * 2**30  # caption embeddings are precomputed up to this size, else encoded per step


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], batch_size: int = 256):
    """Each distinct caption's text embeddings, once, with "" first.

    Returns:
        `(embeddings, rows)`: embeddings (U, L, D) of "" and the U - 1 distinct captions, and
        for each caption its row in them (a long tensor of len(captions)).
    """
    distinct = [""] + sorted(set(captions) - {""})
    row_of = {caption: row for row, caption in enumerate(distinct)}
    embeddings = torch.cat([encode_text(tokenizer, text_encoder, distinct[start:start + batch_size])
                            for start in range(0, len(distinct), batch_size)])
    return embeddings, torch.tensor([row_of[caption] for caption in captions])


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR weights: less weight on nearly clean steps, which are easy.

    min(SNR, gamma) / SNR for noise prediction, min(SNR, gamma) / (SNR + 1) for v-prediction.
    """
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr.clamp(min=1e-8)
    return torch.clamp(snr, max=gamma) / denominator


def denoising_batch(means, stds, scale: float, captions: list[str], table, encode, loop: LoopConfig,
                    caption_dropout: float, step: int, generator: torch.Generator, rank: int, world: int):
    """One step's (latents, text contexts): latents sampled from the cached posteriors (`encode_dataset`),
    captions dropped to "" at `caption_dropout`, contexts from `table` (`encode_captions`) or `encode(texts)`."""
    indices = data.step_indices(len(captions), step, loop.batch_size, loop.seed, rank, world)
    index = torch.tensor(indices)
    latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
    drop = torch.rand(len(indices), generator=generator) < caption_dropout
    if table is not None:
        embeddings, rows = table
        return latents, embeddings[torch.where(drop, 0, rows[index])]  # row 0 is ""
    return latents, encode(["" if dropped else captions[i] for i, dropped in zip(indices, drop.tolist())])


def unet_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, context: torch.Tensor,
              generator: torch.Generator, snr_gamma: float | None = None, weights: torch.Tensor | None = None):
    """Algorithm 1 of Ho et al. 2020 on latents: noise them to a random t and predict the noise.

    `weights` (B, 1, h, w), e.g. from `outline_weights`, shift each image's loss between latent cells;
    each image's loss is their weighted mean, so its scale is that of the unweighted loss.
    """
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                 timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
    error = F.mse_loss(prediction, target, reduction="none")
    if weights is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        per_sample = (weights * error).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * snr_weights(scheduler, timesteps, snr_gamma)
    return per_sample.mean()


def init_folder(config: UnetConfig, latent_channels: int, context_width: int) -> Path | None:
    """The UNet folder `config.init` names (a UNet folder, or a model folder with unet/), checked against the
    latents and text contexts it will be trained on; None for new weights."""
    if not config.init:
        return None
    if config.model:
        raise ValueError(f"`model`: got settings {sorted(config.model)} with `init` {config.init!r}; "
                         "a fine-tuned UNet keeps the settings of the one it starts from, so give one or the other")
    folder = Path(config.init)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise ValueError(f"`init`: got {config.init!r}; expected a UNet folder (with config.json) or a model "
                         "folder with unet/ in it")
    settings = UNet2DConditionModel.load_config(folder)
    found = (settings.get("in_channels"), settings.get("cross_attention_dim"))
    if found != (latent_channels, context_width):
        raise ValueError(f"`init`: the UNet in {str(folder)!r} takes {found[0]} latent channels and text contexts "
                         f"{found[1]} wide; the VAE and text tower here give {latent_channels} and {context_width}")
    return folder


def initial_unet(config: UnetConfig, init: Path | None, latent_shape: tuple[int, ...],
                 context_width: int) -> UNet2DConditionModel:
    """The UNet at `init` (fine-tuning, see `init_folder`), or new weights shaped by `config.model` for
    latents (channels, height, width) and text contexts `context_width` wide."""
    if init is not None:
        return UNet2DConditionModel.from_pretrained(init, torch_dtype=torch.float32)
    channels, size = latent_shape[0], latent_shape[-1]
    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels,
                                cross_attention_dim=context_width, **config.model)


def train_unet(config: UnetConfig, resume: bool = False, progress: bool = True) -> UNet2DConditionModel:
    """Train, save the UNet (EMA weights) in `output_dir/model`, and return it."""
    for name in ("clip", "vae"):
        check_stage_folder(name, getattr(config, name))
    clip = CLIPModel.from_pretrained(config.clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(config.clip)
    text_encoder = clip.text_model.requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(config.vae).eval().requires_grad_(False)
    # checked before any data is drawn and encoded
    init = init_folder(config, vae.config.latent_channels, text_encoder.config.hidden_size)
    scheduler = DDPMScheduler.from_config(config.scheduler)
    dataset = data.open_dataset(config.data, length=config.cache_size, seed=config.loop.seed,
                                max_objects=config.max_objects, partial_captions=config.partial_captions,
                                three_objects_prob=config.three_objects_prob)
    means, stds, captions, outlines = encode_dataset(vae, dataset, config.cache_size, config.image_size,
                                                     edge_weight=config.edge_weight)
    scale = vae.config.scaling_factor
    unet = initial_unet(config, init, tuple(means.shape[1:]), text_encoder.config.hidden_size)

    # The text tower is frozen, so every caption (and "" for dropped ones) is encoded once, here,
    # with the pipeline's own function, instead of at every step, when the table fits in memory.
    table_bytes = (len(set(captions)) + 1) * tokenizer.model_max_length * text_encoder.config.hidden_size * 4
    table = encode_captions(tokenizer, text_encoder, captions) if table_bytes <= TEXT_TABLE_BYTES else None

    def loss_fn(models, step, generator, rank, world):
        # without the table, captions are encoded exactly as the pipeline feeds them to the UNet
        latents, context = denoising_batch(means, stds, scale, captions, table,
                                           lambda texts: encode_text(tokenizer, text_encoder, texts), config.loop,
                                           config.caption_dropout, step, generator, rank, world)
        weights = None
        if outlines is not None:  # the same items denoising_batch took
            weights = outlines[data.step_indices(len(captions), step, config.loop.batch_size, config.loop.seed,
                                                 rank, world)]
        return unet_loss(models["unet"], scheduler, latents, context, generator, config.snr_gamma, weights), {}

    unet = train(config.loop, {"unet": unet}, loss_fn, resume=resume, ema_model="unet", progress=progress,
                 name="unet")["unet"]
    out = Path(config.loop.output_dir) / "model"
    unet.save_pretrained(out)
    return unet


def assemble(clip_dir: str | Path, vae_dir: str | Path, unet_dir: str | Path, scheduler: dict, out: str | Path,
             defaults: dict | None = None, inference_scheduler: str = "ddim",
             weights_dtype: torch.dtype = torch.float16) -> Path:
    """Put the trained parts together as one model folder (diffusers layout) with generation defaults.

    The UNet and VAE weights are stored in `weights_dtype` (half precision by default, half the
    size on disk); `from_pretrained` casts them back to fp32 on the CPU. The text encoder stays
    fp32: transformers loads a model in the dtype it was saved in while diffusers loads fp32, so
    a half-precision text encoder would leave diffusers' pipeline with mixed dtypes.
    """
    from ..pipeline import LatentDiffusionPipeline
    from ..sampling.schedulers import make_scheduler

    clip = CLIPModel.from_pretrained(clip_dir)
    pipe = LatentDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir),
        text_encoder=copy.deepcopy(clip.text_model).eval(),
        vae=AutoencoderKL.from_pretrained(vae_dir).eval(),
        unet=UNet2DConditionModel.from_pretrained(unet_dir).eval(),
        scheduler=make_scheduler(inference_scheduler, scheduler),
        defaults=defaults,
    )
    pipe.to("cpu", weights_dtype).text_encoder.to(torch.float32)
    path = pipe.save_pretrained(out)
    (Path(path) / "training.json").write_text(json.dumps({"clip": str(clip_dir), "vae": str(vae_dir),
                                                          "unet": str(unet_dir)}, indent=2))
    return Path(path)
