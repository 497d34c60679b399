"""Training data: folders of captioned images, and batches addressed by step.

A folder holds images and a `metadata.jsonl` with one `{"file_name": ..., "text": ...}` per
line: the layout Hugging Face datasets reads as "imagefolder". Any dataset whose items are
`{"image": PIL image, "text": str}` works (the shapes set is one).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..images import load_image, to_tensor


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images with captions from `folder/metadata.jsonl`; every entry is checked on opening.

    Raises:
        ValueError naming the file (and line) for an empty folder, a missing or malformed
        metadata file, a missing caption, or an image that does not exist or cannot be read.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        metadata = self.folder / "metadata.jsonl"
        if not self.folder.is_dir():
            raise ValueError(f"`data`: {str(self.folder)!r} is not a folder")
        if not metadata.is_file():
            raise ValueError(f"`data`: {str(self.folder)!r} has no metadata.jsonl "
                             '(one {"file_name": ..., "text": ...} per line)')
        self.items: list[tuple[Path, str]] = []
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"`data`: {where} is not JSON ({error})") from None
            text = entry.get("text") if isinstance(entry, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"`data`: {where} has no caption (a non-empty \"text\")")
            path = self.folder / str(entry.get("file_name", ""))
            if not entry.get("file_name") or not path.is_file():
                raise ValueError(f"`data`: {where} names image {str(path)!r}, which does not exist")
            try:
                with PIL.Image.open(path) as image:
                    image.verify()
            except (PIL.UnidentifiedImageError, OSError) as error:
                raise ValueError(f"`data`: image {str(path)!r} ({where}) cannot be read: {error}") from None
            self.items.append((path, text))
        if not self.items:
            raise ValueError(f"`data`: {str(metadata)!r} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, text = self.items[index]
        return {"image": load_image(path), "text": text}


def open_dataset(spec: str, length: int = 1_000_000, seed: int = 0, max_objects: int = 2,
                 partial_captions: float = 0.0, three_objects_prob: float | None = None, split: str = "train"):
    """`"shapes"` for the procedural shapes set (training split, or every pair with `split` "any";
    scenes of up to `max_objects` objects, `three_objects_prob` of them three when set, some
    captions partial at `partial_captions`), else a folder with metadata.jsonl."""
    if spec == "shapes":
        from ..shapes import ShapesDataset

        return ShapesDataset.with_max_objects(length, seed=seed, max_objects=max_objects,
                                              partial_captions=partial_captions,
                                              three_objects_prob=three_objects_prob, split=split)
    for name, value, unset in (("max_objects", max_objects, 2), ("partial_captions", partial_captions, 0.0),
                               ("three_objects_prob", three_objects_prob, None), ("split", split, "train")):
        if value != unset:
            raise ValueError(f"`{name}`: got {value!r} for data {spec!r}; it applies to the shapes data only")
    return ImageFolderDataset(spec)


@functools.lru_cache(maxsize=4)
def _epoch_order(length: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length)


def step_indices(length: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The dataset indices this process trains on at `step`: epoch-wise shuffles, fixed by the seed.

    The global batch of `step` is positions `step * batch_size ...` of an endless stream of
    shuffled epochs; process `rank` of `world` takes its own contiguous slice of it.
    """
    share = batch_size // world
    first = step * batch_size + rank * share
    indices = []
    for position in range(first, first + share):
        epoch, offset = divmod(position, length)
        indices.append(int(_epoch_order(length, seed, epoch)[offset]))
    return indices


def pixels(images: list[PIL.Image.Image], size: int) -> torch.Tensor:
    """Images -> (B, 3, size, size) float tensor in [-1, 1], as the pipeline prepares a reference image."""
    return torch.cat([to_tensor(load_image(image), size, size) for image in images])


def batch(dataset, indices: list[int], size: int) -> tuple[torch.Tensor, list[str]]:
    """Pixels (B, 3, size, size) in [-1, 1] and captions for the given indices."""
    items = [dataset[i] for i in indices]
    return pixels([item["image"] for item in items], size), [item["text"] for item in items]
