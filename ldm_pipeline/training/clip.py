"""Train a small CLIP (text and vision towers) contrastively on image-caption pairs.

Radford et al. 2021: the image and text embeddings of a batch are scored all against all,
and a symmetric cross-entropy pulls each image towards its own caption. Its text tower
becomes the pipeline's text encoder; the whole model is kept for CLIP score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from . import data
from .loop import LoopConfig, check_stage_folder, train


@dataclass
class ClipConfig:
    """What to train and on what."""

    loop: LoopConfig
    data: str = "shapes"  # "shapes" or a folder with metadata.jsonl
    max_objects: int = 2  # shapes data: scenes of up to 2 objects (the bundled model) or 3
    partial_captions: float = 0.0  # shapes data: chance that an object's phrase names only colour or shape
    tokenizer: str = ""  # folder with vocab.json + merges.txt (built by `ldm train tokenizer`)
    image_size: int = 64
    text: dict = field(default_factory=dict)  # transformers CLIPTextConfig settings
    vision: dict = field(default_factory=dict)  # transformers CLIPVisionConfig settings
    projection_dim: int = 64


def build_clip(config: ClipConfig, tokenizer: CLIPTokenizer) -> CLIPModel:
    """A randomly initialised CLIPModel whose text tower fits the tokenizer."""
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **config.text}
    vision = {"image_size": config.image_size, **config.vision}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))


def contrastive_loss(logits_per_image: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric cross-entropy over a (B, B) similarity matrix, where equal captions count as matches.

    Small caption sets repeat within a batch; treating a repeat as a negative would push apart
    pairs that are in fact the same, so the target spreads evenly over all matching captions.
    """
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits_per_image.dtype,
                        device=logits_per_image.device)
    target = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(target * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    text_to_image = -(target * F.log_softmax(logits_per_image.t(), dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def train_clip(config: ClipConfig, resume: bool = False, progress: bool = True) -> CLIPModel:
    """Train, save the model (and its tokenizer) in `output_dir/model`, and return it."""
    check_stage_folder("tokenizer", config.tokenizer)
    tokenizer = CLIPTokenizer.from_pretrained(config.tokenizer)
    dataset = data.open_dataset(config.data, seed=config.loop.seed, max_objects=config.max_objects,
                                partial_captions=config.partial_captions)
    model = build_clip(config, tokenizer)

    def loss_fn(models, step, generator, rank, world):
        indices = data.step_indices(len(dataset), step, config.loop.batch_size, config.loop.seed, rank, world)
        pixels, captions = data.batch(dataset, indices, config.image_size)
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        output = models["clip"](input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                pixel_values=pixels)
        loss = contrastive_loss(output.logits_per_image, captions)
        accuracy = (output.logits_per_image.argmax(1) == torch.arange(len(captions))).float().mean()
        return loss, {"batch_accuracy": accuracy.item()}

    model = train(config.loop, {"clip": model}, loss_fn, resume=resume, progress=progress, name="clip")["clip"]
    out = Path(config.loop.output_dir) / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocess.json").write_text(json.dumps({"image_size": config.image_size, "range": [-1, 1]}))
    return model
