"""Fine-tune a LoRA (Hu et al. 2021) of the UNet, and optionally the text encoder, of any model the
pipeline loads, on a captioned image folder, with the shared loop (checkpoints, resume, loss plot).

The base weights stay frozen: peft adds low-rank layers to the attention projections and only
those train, with the UNet stage's loss (`unet.unet_loss`) on latents the model's own VAE
encodes once. The result is a LoRA folder in diffusers' format (`pytorch_lora_weights.safetensors`,
with lora_alpha in its metadata) that `pipe.load_lora_weights` and diffusers read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..files import atomic_folder
from ..text.encode import text_states
from . import data
from .loop import LoopConfig, train
from .unet import denoising_batch, encode_captions, encode_dataset, unet_loss

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoraTrainConfig:
    """What to adapt, how, and on what."""

    loop: LoopConfig
    data: str = ""  # a folder with metadata.jsonl (`ldm train configs/lora.json --data FOLDER`)
    model: str | None = None  # the base model: a folder or Hub id; None: the bundled model
    image_size: int | None = None  # default: the UNet's sample size times the VAE factor
    rank: int = 8
    alpha: float | None = None  # lora_alpha; None: the rank (scale 1)
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    text_encoder: bool = False  # also adapt the text encoder (new words)
    text_targets: list[str] = field(default_factory=lambda: list(TEXT_TARGETS))
    caption_dropout: float = 0.0
    snr_gamma: float | None = None

    def __post_init__(self):
        if not self.data:
            raise ValueError("`data`: a LoRA trains on a captioned image folder; pass --data FOLDER "
                             "(metadata.jsonl with file_name and text per line)")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`: got {self.rank!r}; expected an integer >= 1")
        if self.alpha is not None and (not _is_number(self.alpha) or self.alpha <= 0):
            raise ValueError(f"`alpha`: got {self.alpha!r}; expected a number > 0 or null (= rank)")
        if not _is_number(self.caption_dropout) or not 0 <= self.caption_dropout < 1:
            raise ValueError(f"`caption_dropout`: got {self.caption_dropout!r}; expected a number in [0, 1)")
        if self.snr_gamma is not None and (not _is_number(self.snr_gamma) or self.snr_gamma <= 0):
            raise ValueError(f"`snr_gamma`: got {self.snr_gamma!r}; expected a number > 0 or null (off)")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 8):
            raise ValueError(f"`image_size`: got {self.image_size!r}; expected an integer >= 8 or null")
        if not isinstance(self.text_encoder, bool):  # "no" would be true
            raise ValueError(f"`text_encoder`: got {self.text_encoder!r}; expected true or false")
        if not _is_number(self.loop.learning_rate) or self.loop.learning_rate <= 0:
            raise ValueError(f"`learning_rate`: got {self.loop.learning_rate!r}; expected a number > 0")
        for name in ("unet_targets", "text_targets"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"`{name}`: got {value!r}; expected a non-empty list of module names")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_targets(model: torch.nn.Module, targets: list[str], key: str) -> None:
    """Raise a ValueError naming `key` for targets that match no layer of `model`.

    peft matches a target against the ends of module names and adapts those that match, leaving
    a misspelt one out without a word while the others still match.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    unmatched = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if unmatched:
        raise ValueError(f"`{key}`: {unmatched} name no linear or convolution layer of the "
                         f"{type(model).__name__} (its attention projections: "
                         f"{UNET_TARGETS if key == 'unet_targets' else TEXT_TARGETS})")


def _adapter_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)


def save_lora(unet, text_encoder, out: str | Path) -> Path:
    """Write the adapters of `unet` (and of `text_encoder`, if it has one) as a diffusers LoRA folder.

    The folder is written under a temporary name and renamed: a kill while writing leaves the
    previous LoRA (or none), never a cut-off file under the name the pipeline loads.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for kind, model in (("unet", unet), ("text_encoder", text_encoder)):
        if getattr(model, "peft_config", None):
            # peft's key names, as they are: diffusers' convert_state_dict_to_diffusers renames only the
            # attention projections (to `.lora.down`), and its loader then reads one naming or the other,
            # so a LoRA of attention and convolutions lost its attention half on loading
            layers[f"{kind}_lora_layers"] = get_peft_model_state_dict(model)
            layers[f"{kind}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    with atomic_folder(out) as temporary:
        StableDiffusionPipeline.save_lora_weights(temporary, **layers)
    return Path(out)


def train_lora(config: LoraTrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train, write the LoRA to `output_dir/lora`, and return that folder."""
    from ..pipeline import LatentDiffusionPipeline

    dataset = data.open_dataset(config.data)  # checks the folder before the model loads
    pipe = LatentDiffusionPipeline.from_pretrained(config.model, torch_dtype=torch.float32)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    check_targets(unet, config.unet_targets, "unet_targets")  # before the data is encoded
    if config.text_encoder:
        check_targets(text_encoder, config.text_targets, "text_targets")
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False).eval()
    size = config.image_size or unet.config.sample_size * pipe.vae_scale_factor
    means, stds, captions, _ = encode_dataset(vae, dataset, len(dataset), size)
    scale = vae.config.scaling_factor
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    torch.manual_seed(config.loop.seed)  # the adapters' random initial weights
    unet.add_adapter(_adapter_config(config.rank, config.alpha, config.unet_targets))
    models = {"unet": unet}
    table = None
    if config.text_encoder:
        text_encoder.add_adapter(_adapter_config(config.rank, config.alpha, config.text_targets))
        models["text_encoder"] = text_encoder
    else:  # a frozen text encoder: every caption is encoded once
        table = encode_captions(pipe.tokenizer, text_encoder, captions)

    def loss_fn(models, step, generator, rank, world):
        latents, context = denoising_batch(means, stds, scale, captions, table,
                                           lambda texts: text_states(pipe.tokenizer, models["text_encoder"], texts),
                                           config.loop, config.caption_dropout, step, generator, rank, world)
        return unet_loss(models["unet"], scheduler, latents, context, generator, config.snr_gamma), {}

    trained = train(config.loop, models, loss_fn, resume=resume, progress=progress, name="lora",
                    trainable_only=True)
    out = save_lora(trained["unet"], trained.get("text_encoder"), Path(config.loop.output_dir) / "lora")
    (out / "training.json").write_text(json.dumps({"base_model": config.model or "bundled", "data": config.data,
                                                   "rank": config.rank, "alpha": config.alpha or config.rank,
                                                   "text_encoder": config.text_encoder,
                                                   "steps": config.loop.steps}, indent=2))
    return out
