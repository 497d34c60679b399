"""Train an edge ControlNet (Zhang et al. 2023) for a model the pipeline loads, on the shared loop.

The net is `ControlNetModel.from_unet`: a copy of the UNet's encoder whose outputs pass through
convolutions that start at zero, so before the first step it adds nothing and the model draws
exactly what it drew without it. The UNet, VAE and text encoder stay frozen; only the net trains,
with the UNet stage's loss (`unet.unet_loss`: noise or velocity, whichever the model's scheduler
predicts) on the frozen UNet's prediction with the net's residuals added.

Its control pictures are Canny edges (`conditioning.preprocess.canny`) of each training image at
the size it is drawn: white one-pixel outlines on black, as `ldm generate --control-preprocess
canny` makes them. On the shapes data some captions name only each object's colour and shape
(`unplaced_captions`: "an orange circle", no position, no size), so that the outline alone decides
where an object goes and how large it is. A captioned image folder (metadata.jsonl) works the same
way, its edges made from its images. The result is a diffusers `ControlNetModel` folder that
`ControlNetModel.from_pretrained` and `loading.controlnet.load_controlnet` read.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import ControlNetModel, DDPMScheduler

from ..conditioning.preprocess import canny
from ..files import atomic_folder
from ..images import load_image
from ..text.encode import encode_text
from . import data
from .loop import LoopConfig, train
from .unet import TEXT_TABLE_BYTES, encode_captions, unet_loss

# diffusers' widths of the control picture's embedding for an SD VAE (8x: four widths, three halvings)
EMBEDDING_WIDTHS = (16, 32, 96, 256)


@dataclass
class ControlNetTrainConfig:
    """What to steer, with which pictures, on what."""

    loop: LoopConfig
    model: str | None = None  # the base model: a folder or Hub id; None: the bundled model
    data: str = "shapes"  # "shapes", or a folder with metadata.jsonl (`--data FOLDER`)
    max_objects: int = 2  # shapes data: scenes of up to this many objects
    unplaced_captions: float = 0.5  # shapes data: chance that a caption names only colour and shape
    cache_size: int = 20_000  # items encoded once and trained on (a folder: all of them, up to this many)
    image_size: int | None = None  # default: the UNet's sample size times the VAE factor
    canny_low: int = 100  # Canny's hysteresis thresholds (OpenCV's, on 0-255 grey levels)
    canny_high: int = 200
    # widths of the control picture's embedding, one more than the VAE halves the picture (None: diffusers')
    conditioning_channels: list[int] | None = None
    caption_dropout: float = 0.1  # captions dropped to "", as the UNet was trained (classifier-free guidance)
    snr_gamma: float | None = None

    def __post_init__(self):
        if not _is_number(self.unplaced_captions) or not 0 <= self.unplaced_captions <= 1:
            raise ValueError(f"`unplaced_captions`: got {self.unplaced_captions!r}; expected a chance from 0 to 1")
        if not _is_number(self.caption_dropout) or not 0 <= self.caption_dropout < 1:
            raise ValueError(f"`caption_dropout`: got {self.caption_dropout!r}; expected a number in [0, 1)")
        if self.snr_gamma is not None and (not _is_number(self.snr_gamma) or self.snr_gamma <= 0):
            raise ValueError(f"`snr_gamma`: got {self.snr_gamma!r}; expected a number > 0 or null (off)")
        if not (_is_int(self.canny_low) and _is_int(self.canny_high) and 0 <= self.canny_low < self.canny_high):
            raise ValueError(f"`canny_low`, `canny_high`: got {self.canny_low!r}, {self.canny_high!r}; expected "
                             "integers with 0 <= canny_low < canny_high")
        if not _is_int(self.cache_size) or self.cache_size < 1:
            raise ValueError(f"`cache_size`: got {self.cache_size!r}; expected an integer >= 1")
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 8):
            raise ValueError(f"`image_size`: got {self.image_size!r}; expected an integer >= 8 or null")
        widths = self.conditioning_channels
        if widths is not None and (not isinstance(widths, list) or not widths
                                   or not all(_is_int(w) and w >= 1 for w in widths)):
            raise ValueError(f"`conditioning_channels`: got {widths!r}; expected a list of integers >= 1 or null")
        if not _is_number(self.loop.learning_rate) or self.loop.learning_rate <= 0:
            raise ValueError(f"`learning_rate`: got {self.loop.learning_rate!r}; expected a number > 0")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def embedding_widths(config: ControlNetTrainConfig, vae_scale_factor: int) -> tuple[int, ...]:
    """The control picture embedding's widths: it halves the picture once between each two, down to the latents."""
    halvings = round(math.log2(vae_scale_factor))
    if config.conditioning_channels is None:
        widths = list(EMBEDDING_WIDTHS[:halvings + 1])
        while len(widths) < halvings + 1:
            widths.append(widths[-1] * 2)
        return tuple(widths)
    if len(config.conditioning_channels) != halvings + 1:
        raise ValueError(f"`conditioning_channels`: got {config.conditioning_channels!r}; the VAE makes latents "
                         f"{vae_scale_factor}x smaller than the picture, so the embedding needs {halvings + 1} widths "
                         f"({halvings} halvings)")
    return tuple(config.conditioning_channels)


def initial_controlnet(unet, widths: tuple[int, ...], seed: int) -> ControlNetModel:
    """A ControlNet copied from `unet` (its encoder's weights), its output convolutions at zero.

    The control picture's embedding, the only part not copied, draws its first weights from `seed`.
    """
    torch.manual_seed(seed)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)


def edge_map(image: PIL.Image.Image, size: int, low: int = 100, high: int = 200) -> PIL.Image.Image:
    """The control picture of a training image: Canny's edges of it at `size` x `size` (white outlines on black)."""
    image = load_image(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=PIL.Image.LANCZOS)
    return canny(image, low, high)


@dataclass
class ControlData:
    """The training items, encoded once: latent posteriors, edge maps and caption embeddings.

    `rows` holds each item's caption's row in `table[0]`, and `unplaced_rows` that of its caption naming only
    colour and shape (shapes data; else the same rows); `table` is None where every caption's embeddings
    would not fit in memory, and captions are then encoded at each step.
    """

    means: torch.Tensor  # (N, C, h, w)
    stds: torch.Tensor
    edges: torch.Tensor  # (N, H, W) bool: an edge pixel
    captions: list[str]
    unplaced: list[str]
    table: tuple[torch.Tensor, torch.Tensor] | None
    scale: float

    def __len__(self) -> int:
        return len(self.captions)


@torch.no_grad()
def encode_controls(vae, dataset, count: int, size: int, low: int, high: int, batch_size: int = 128):
    """The first `count` items' posteriors (means, stds), edge maps (N, size, size) as booleans, captions and
    (shapes data) captions naming only colour and shape."""
    from ..shapes import ShapesDataset, unplaced_caption

    means, stds, edges, captions, unplaced = [], [], [], [], []
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        items = [dataset[i] for i in indices]
        pictures = [load_image(item["image"]) for item in items]
        posterior = vae.encode(data.pixels(pictures, size)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        edges.extend(torch.from_numpy(np.asarray(edge_map(picture, size, low, high))[:, :, 0] > 0)
                     for picture in pictures)
        captions.extend(item["text"] for item in items)
        if isinstance(dataset, ShapesDataset):
            unplaced.extend(unplaced_caption(dataset.scene(i)) for i in indices)
        else:
            unplaced.extend(item["text"] for item in items)
    return torch.cat(means), torch.cat(stds), torch.stack(edges), captions, unplaced


def control_data(pipe, config: ControlNetTrainConfig, dataset, size: int) -> ControlData:
    """The first `config.cache_size` items of `dataset` encoded with `pipe`'s frozen VAE and text encoder."""
    means, stds, edges, captions, unplaced = encode_controls(pipe.vae, dataset, config.cache_size, size,
                                                             config.canny_low, config.canny_high)
    encoder = pipe.text_encoder
    table_bytes = (len(set(captions) | set(unplaced)) + 1) * pipe.tokenizer.model_max_length \
        * encoder.config.hidden_size * 4
    table = None
    if table_bytes <= TEXT_TABLE_BYTES:
        embeddings, rows = encode_captions(pipe.tokenizer, encoder, captions + unplaced)
        table = (embeddings, rows)
    return ControlData(means, stds, edges, captions, unplaced, table, pipe.vae.config.scaling_factor)


def control_batch(items: ControlData, encode, loop: LoopConfig, unplaced_chance: float, caption_dropout: float,
                  step: int, generator: torch.Generator, rank: int, world: int):
    """One step's (latents, text contexts, control pictures (B, 3, H, W) in [0, 1], which captions were unplaced).

    A caption names only colour and shape at `unplaced_chance` and is dropped to "" at `caption_dropout`, both
    drawn from `generator`, so the same item is seen with either caption over the epochs.
    """
    indices = data.step_indices(len(items), step, loop.batch_size, loop.seed, rank, world)
    index = torch.tensor(indices)
    latents = (items.means[index] + items.stds[index] * torch.randn(items.means[index].shape, generator=generator)) \
        * items.scale
    unplaced = torch.rand(len(indices), generator=generator) < unplaced_chance
    drop = torch.rand(len(indices), generator=generator) < caption_dropout
    if items.table is not None:
        embeddings, rows = items.table
        row = torch.where(unplaced, rows[len(items) + index], rows[index])
        context = embeddings[torch.where(drop, 0, row)]  # row 0 is ""
    else:
        context = encode(["" if dropped else (items.unplaced[i] if bare else items.captions[i])
                          for i, bare, dropped in zip(indices, unplaced.tolist(), drop.tolist())])
    pictures = items.edges[index].float()[:, None].expand(-1, 3, -1, -1)
    return latents, context, pictures, unplaced


def controlled(net, unet, pictures: torch.Tensor):
    """The UNet as `unet_loss` calls it, `unet(x, t, encoder_hidden_states=c)`, with the net's residuals added."""
    def call(sample, timestep, encoder_hidden_states):
        down, mid = net(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=pictures,
                        return_dict=False)
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return call


def controlnet_loss(net, unet, scheduler: DDPMScheduler, latents, context, pictures, generator,
                    snr_gamma: float | None = None) -> torch.Tensor:
    """The UNet stage's loss (`unet.unet_loss`) on the frozen UNet's prediction with the net's residuals."""
    return unet_loss(controlled(net, unet, pictures), scheduler, latents, context, generator, snr_gamma)


def save_controlnet(net: ControlNetModel, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the net as a diffusers ControlNetModel folder (config.json, diffusion_pytorch_model.safetensors),
    in `dtype` when given; a kill while writing leaves the previous folder (or none), never a cut-off one."""
    if dtype is not None:  # torch's own `to`: diffusers' warns of modules kept in fp32 (a ControlNet has none)
        net = torch.nn.Module.to(copy.deepcopy(net), dtype)
    with atomic_folder(out) as temporary:
        net.save_pretrained(temporary, safe_serialization=True)
    return Path(out)


def train_controlnet(config: ControlNetTrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train, write the net to `output_dir/model` (with training.json), and return that folder."""
    from ..pipeline import LatentDiffusionPipeline

    dataset = data.open_dataset(config.data, length=config.cache_size, seed=config.loop.seed,
                                max_objects=config.max_objects)  # checks a folder before the model loads
    pipe = LatentDiffusionPipeline.from_pretrained(config.model, torch_dtype=torch.float32)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False).eval()
    widths = embedding_widths(config, pipe.vae_scale_factor)  # checked before the data is encoded
    size = config.image_size or unet.config.sample_size * pipe.vae_scale_factor
    items = control_data(pipe, config, dataset, size)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    net = initial_controlnet(unet, widths, config.loop.seed)
    unplaced_chance = config.unplaced_captions if config.data == "shapes" else 0.0

    def loss_fn(models, step, generator, rank, world):
        latents, context, pictures, _ = control_batch(
            items, lambda texts: encode_text(pipe.tokenizer, text_encoder, texts), config.loop, unplaced_chance,
            config.caption_dropout, step, generator, rank, world)
        return controlnet_loss(models["controlnet"], unet, scheduler, latents, context, pictures, generator,
                               config.snr_gamma), {}

    trained = train(config.loop, {"controlnet": net}, loss_fn, resume=resume, ema_model="controlnet",
                    progress=progress, name="controlnet")["controlnet"]
    out = save_controlnet(trained, Path(config.loop.output_dir) / "model")
    settings = {k: v for k, v in asdict(config).items() if k != "loop"}
    (out / "training.json").write_text(json.dumps({**settings, "model": config.model or "bundled",
                                                   "image_size": size, "steps": config.loop.steps}, indent=2))
    return out
