"""Recipes in PNG files: two text chunks, A1111's `parameters` and our JSON with every recipe.

See `recipes` for the two formats; writing is atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch

from ..files import atomic_path
from . import infotext
from .recipes import CHUNK, FORMAT, Recipe, recipes_of


def png_info(recipes: list[Recipe], grid: tuple[int, int] | None = None) -> PIL.PngImagePlugin.PngInfo:
    """The two text chunks: A1111's `parameters` (of the first image) and our JSON with every recipe."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", recipes[0].parameters())
    payload = {"format": FORMAT, "recipes": [r.to_dict() for r in recipes]}
    if grid is not None:
        payload["grid"] = {"rows": grid[0], "cols": grid[1]}
    info.add_text(CHUNK, json.dumps(payload))
    return info


def write_png(image: PIL.Image.Image, path: str | os.PathLike, recipes: list[Recipe],
              grid: tuple[int, int] | None = None) -> Path:
    """Write `image` to `path` as a PNG carrying `recipes`, atomically (a temporary file, then a rename).

    Args:
        recipes: one recipe, or one per cell of a grid (row by row) with `grid=(rows, cols)`.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"`path`: got {str(path)!r}; recipes are written into PNG files, expected a .png name")
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=png_info(recipes, grid))
    return path


def _pil_images(output) -> list[PIL.Image.Image]:
    found = output.images
    if isinstance(found, list):
        return found
    if isinstance(found, torch.Tensor) and found.ndim == 4 and found.shape[1] == 3:
        found = found.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(found, np.ndarray) and found.ndim == 4 and found.shape[3] == 3:
        return [PIL.Image.fromarray(frame) for frame in (found * 255).round().astype(np.uint8)]
    raise ValueError("`output_type`: latents cannot be saved as images; draw with output_type='pil', 'np' or 'pt'")


def save_output(output, path: str | os.PathLike) -> list[Path]:
    """Write each image of a `PipelineOutput` as a PNG carrying its recipe.

    Args:
        path: a `.png` file for a single image, or a folder (made if needed) for any number:
            there image i is `{i:03d}-seed{seed}.png` (`{i:03d}.png` without seeds).

    Returns:
        The paths written, in image order.
    """
    path = Path(path)
    pictures = _pil_images(output)
    recipes = recipes_of(output)
    if path.suffix:
        if path.suffix.lower() != ".png":
            raise ValueError(f"`path`: got {str(path)!r}; expected a .png file name or a folder")
        if len(pictures) != 1:
            raise ValueError(f"`path`: {str(path)!r} is one file but the output holds {len(pictures)} images; "
                             "give a folder")
        return [write_png(pictures[0], path, recipes)]
    if path.is_file():
        raise ValueError(f"`path`: {str(path)!r} is a file; expected a .png file name or a folder")
    names = [f"{i:03d}-seed{r.seed}.png" if r.seed is not None else f"{i:03d}.png" for i, r in enumerate(recipes)]
    return [write_png(picture, path / name, [recipe]) for picture, name, recipe in zip(pictures, names, recipes)]


def read_recipes(path: str | os.PathLike) -> tuple[list[Recipe], tuple[int, int] | None]:
    """Every recipe in a PNG, and its grid shape (rows, cols) or None.

    Reads our JSON chunk; without it, the A1111 `parameters` chunk (one recipe, without the
    scheduler config, dtype and reference hash).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path`: no file at {str(path)!r}")
    try:
        with PIL.Image.open(path) as opened:
            chunks = dict(getattr(opened, "text", None) or opened.info)
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"`path`: {str(path)!r} is not a readable image ({error})") from error
    if CHUNK in chunks:
        try:
            payload = json.loads(chunks[CHUNK])
            version = payload["format"]
            recipes = [Recipe.from_dict(r) for r in payload["recipes"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"`path`: the {CHUNK!r} chunk of {str(path)!r} is damaged ({error})") from error
        if version > FORMAT:
            raise ValueError(f"`path`: {str(path)!r} holds a recipe of format {version}, written by a newer "
                             f"ldm-pipeline; this one reads format {FORMAT}")
        grid = payload.get("grid")
        return recipes, (grid["rows"], grid["cols"]) if grid else None
    if isinstance(chunks.get("parameters"), str):
        return [Recipe(**infotext.parse_parameters(chunks["parameters"], str(path)))], None
    raise ValueError(f"`path`: {str(path)!r} carries no recipe (neither an {CHUNK!r} nor a 'parameters' text "
                     "chunk); only PNGs written by ldm-pipeline or A1111-style tools have one")


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe of a PNG written by `PipelineOutput.save`, `ldm generate` or an A1111-style tool.

    A grid holds several: this raises for one, naming them; use `read_recipes`.
    """
    recipes, _ = read_recipes(path)
    if len(recipes) != 1:
        raise ValueError(f"`path`: {str(path)!r} is a grid of {len(recipes)} images with a recipe each; "
                         "use ldm_pipeline.read_recipes(path) for the list")
    return recipes[0]


