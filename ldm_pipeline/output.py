"""`PipelineOutput`: what a pipeline call returns, the images and what drew them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .provenance import png, recipes


def steps_text(count: int) -> str:
    """"1 step", "4 steps": a number of denoising steps as the CLI and the reports print it."""
    return f"{count} step" if count == 1 else f"{count} steps"


@dataclass
class PipelineOutput:
    """What a call returns: the images and everything needed to draw them again."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor  # per output_type
    seeds: list[int] | None  # one per image; None when the caller passed generators
    height: int
    width: int
    num_inference_steps: int  # as asked for
    steps_run: int  # denoising steps actually run (fewer with strength < 1 or a callback stop)
    scheduler: str
    guidance_scale: float
    strength: float | None  # None for text-to-image
    prompts: list[str] | None = field(default=None)
    call: recipes.CallRecord | None = field(default=None, repr=False)  # for the images' recipes

    def recipes(self) -> list[recipes.Recipe]:
        """One `Recipe` per image: prompt, seed, settings and model hash, enough to draw it again."""
        return recipes.recipes_of(self)

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the images as PNGs carrying their recipes, atomically: `path` is a .png file for one
        image, or a folder for any number (image i is `{i:03d}-seed{seed}.png`). Returns the paths."""
        return png.save_output(self, path)
