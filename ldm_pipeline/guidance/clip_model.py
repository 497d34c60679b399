"""A CLIP model: image and text embeddings, CLIP score; shared by evaluation and CLIP guidance.

CLIP score (Hessel et al. 2021, as torchmetrics defines it) is `100 * max(cos(E_text, E_image), 0)`
per image-caption pair. Any transformers `CLIPModel` works: the one trained with the bundled
shapes model (the default, `SHAPES_CLIP`) or a user's, local or from the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import CLIPModel, CLIPTokenizer

from ..loading.folders import resolve_model_dir

SHAPES_CLIP = Path(__file__).resolve().parents[1] / "models" / "shapes_clip"
# OpenAI CLIP's pixel normalisation, used when a model folder does not say its own.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_PATTERNS = ["*.json", "*.txt", "model.safetensors"]


@dataclass(frozen=True)
class Preprocess:
    """How a CLIP vision tower wants its pixels: a square side and a per-channel normalisation."""

    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @classmethod
    def for_folder(cls, folder: Path, model: CLIPModel) -> "Preprocess":
        """Read `preprocess.json` (this project's CLIPs) or `preprocessor_config.json` (transformers')."""
        ours, theirs = folder / "preprocess.json", folder / "preprocessor_config.json"
        if ours.is_file():
            settings = json.loads(ours.read_text())
            low, high = settings.get("range", (0, 1))  # pixels in [0, 1] are mapped to [low, high]
            return cls(settings["image_size"], (-low / (high - low),) * 3, (1 / (high - low),) * 3)
        if theirs.is_file():
            settings = json.loads(theirs.read_text())
            crop = settings.get("crop_size") or settings.get("size") or model.config.vision_config.image_size
            side = crop if isinstance(crop, int) else crop.get("height", crop.get("shortest_edge"))
            return cls(int(side), tuple(settings.get("image_mean", OPENAI_MEAN)),
                       tuple(settings.get("image_std", OPENAI_STD)))
        return cls(model.config.vision_config.image_size)


def resize(image: PIL.Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to `size`, antialiased, channel by channel in float.

    Resizing in uint8 or with an aliasing kernel shifts FID by more than many of the effects
    people measure (Parmar et al. 2022, "clean-fid"), so every image of both sets goes through
    PIL's bicubic filter, which widens its support when it shrinks, on float32 channels.

    Returns:
        A float32 array (size, size, 3) in [0, 1].
    """
    rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = np.asarray(rgb.crop((left, top, left + side, top + side)), dtype=np.float32) / 255
    if side == size:
        return square
    channels = [np.asarray(PIL.Image.fromarray(square[..., c], mode="F").resize((size, size), PIL.Image.BICUBIC))
                for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 1)


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's weights, so that caches and reports tell models apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


class Clip:
    """A `CLIPModel` with its tokenizer and pixel preprocessing.

    Args:
        model: a transformers `CLIPModel` (it is put in eval mode; its weights are not changed).
        tokenizer: its `CLIPTokenizer`.
        preprocess: its pixel size and normalisation.
        name: what reports call it; the weights' digest is appended.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, preprocess: Preprocess, name: str = "clip"):
        self.model, self.tokenizer, self.preprocess = model.eval(), tokenizer, preprocess
        self.name = f"{name}@{weights_digest(model)}"

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | None = None, device: str = "cpu") -> "Clip":
        """Load a CLIP folder or Hub id; with no argument, the CLIP trained with the bundled model."""
        folder = resolve_model_dir(path_or_id if path_or_id is not None else SHAPES_CLIP, HUB_PATTERNS)
        if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")) \
                and (folder / "config.json").is_file() and not Path(str(path_or_id)).exists():
            # Some Hub CLIPs (older uploads) carry only pickled weights.
            folder = resolve_model_dir(path_or_id, ["pytorch_model.bin"])
        if not (folder / "config.json").is_file():
            raise ValueError(f"`clip`: got {str(path_or_id)!r}; expected a transformers CLIPModel folder or Hub id "
                             "(a folder with config.json and the weights)")
        model = CLIPModel.from_pretrained(folder, dtype=torch.float32).to(device)
        name = "shapes_clip" if path_or_id is None else str(path_or_id)
        return cls(model, CLIPTokenizer.from_pretrained(folder), Preprocess.for_folder(folder, model), name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """Images -> the vision tower's input (B, 3, S, S)."""
        array = np.stack([resize(image, self.preprocess.size) for image in images])
        array = (array - np.array(self.preprocess.mean, np.float32)) / np.array(self.preprocess.std, np.float32)
        return torch.from_numpy(array).permute(0, 3, 1, 2).to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: list[PIL.Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Projected image embeddings (B, P), not normalised."""
        chunks = [self.model.get_image_features(pixel_values=self.pixels(images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        return torch.cat([_tensor(chunk) for chunk in chunks]).float().cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Projected text embeddings (B, P), not normalised; captions longer than the model's limit are cut."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
            chunks.append(_tensor(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                               attention_mask=tokens["attention_mask"])))
        return torch.cat(chunks).float().cpu()

    def score(self, images: list[PIL.Image.Image], texts: list[str]) -> np.ndarray:
        """CLIP score of each image with its caption: `100 * max(cos, 0)`, shape (B,)."""
        if len(images) != len(texts):
            raise ValueError(f"`images`, `texts`: got {len(images)} images and {len(texts)} captions; "
                             "expected one caption per image")
        cos = torch.nn.functional.cosine_similarity(self.image_embeddings(images), self.text_embeddings(texts))
        return (100 * cos.clamp(min=0)).numpy()


def _tensor(output) -> torch.Tensor:
    # transformers 5 returns a model output with the embeddings as `pooler_output`; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
