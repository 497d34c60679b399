"""Feature extractors for FID: images in, an (N, D) float array out, and a `name` for the report.

- `ClipFeatures`: the projected image embeddings of a CLIP vision tower. For the shapes domain
  this is the CLIP trained with the bundled model, which knows what the pictures are about
  (Kynkäänniemi et al. 2023 argue CLIP features also make FID less fooled on natural images).
- `InceptionFeatures`: the 2048-d pool features of the Inception-v3 network behind the standard
  FID, from the TorchScript file NVIDIA publishes, when it is on disk (it is never downloaded).

Both resize every image the same antialiased way (`clip.resize`). Numbers from different
extractors are different quantities and must never be compared; reports carry the name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .clip import Clip, resize
from .fid import default_cache_dir

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"


class ClipFeatures:
    """FID features from a CLIP vision tower (projected image embeddings, (N, P))."""

    def __init__(self, clip: Clip):
        self.clip = clip
        self.name = f"clip-image-embeddings:{clip.name}"

    def __call__(self, images: list[PIL.Image.Image]) -> np.ndarray:
        return self.clip.image_embeddings(images).numpy().astype(np.float64)


def inception_path(path: str | os.PathLike | None = None) -> Path:
    """Where the Inception weights are: `path`, else `$LDM_INCEPTION_WEIGHTS`, else the cache folder."""
    candidate = path or os.environ.get("LDM_INCEPTION_WEIGHTS") or default_cache_dir().parent / INCEPTION_FILE
    candidate = Path(candidate).expanduser()
    if not candidate.is_file():
        raise FileNotFoundError(
            f"Inception-v3 FID weights: no file at {str(candidate)!r}. Download {INCEPTION_URL} where there is "
            f"a network and pass its path (`--inception PATH` or LDM_INCEPTION_WEIGHTS), or use CLIP features.")
    return candidate


class InceptionFeatures:
    """FID features from the standard Inception-v3 (TorchScript, called as `net(x, return_features=True)`).

    The network takes (B, 3, 299, 299) floats in [0, 255] and returns (B, 2048) pool features.

    Args:
        path: the TorchScript file (see `inception_path` for where it is looked for).
        device: where to run it.
        batch_size: images per forward pass.
    """

    size = 299

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 50):
        self.path = inception_path(path)
        self.net = torch.jit.load(str(self.path), map_location=device).eval()
        self.device, self.batch_size = device, batch_size
        self.name = f"inception-v3:{self.path.name}"

    @torch.no_grad()
    def __call__(self, images: list[PIL.Image.Image]) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            array = np.stack([resize(image, self.size) for image in images[start:start + self.batch_size]]) * 255
            pixels = torch.from_numpy(array).permute(0, 3, 1, 2).to(self.device)
            chunks.append(self.net(pixels, return_features=True).reshape(len(array), -1).double().cpu().numpy())
        return np.concatenate(chunks)


def make_extractor(kind: str, clip: Clip | None = None, inception: str | os.PathLike | None = None,
                   device: str = "cpu"):
    """`kind` "clip" (with `clip`, default: the bundled shapes CLIP) or "inception" (with its weights file)."""
    if kind == "clip":
        return ClipFeatures(clip or Clip.from_pretrained(device=device))
    if kind == "inception":
        return InceptionFeatures(inception, device=device)
    raise ValueError(f"`features`: got {kind!r}; expected 'clip' or 'inception'")
