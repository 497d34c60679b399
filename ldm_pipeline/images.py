"""Image conversion: anything a user may hand us -> RGB, pixels <-> tensors, and grids.

The VAE works on tensors in [-1, 1] of shape (B, 3, H, W); users work with PIL images,
numpy arrays, tensors and file paths in every mode PIL knows. This module is the border.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def array_to_unit_float(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Scale an integer or float array to float32 in [0, 1]; errors name the argument `name`."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        _check_finite(array, name)
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(
                f"`{name}`: a float array must hold values in [0, 1], got range "
                f"[{array.min():.3g}, {array.max():.3g}]"
            )
        return array.astype(np.float32)
    raise TypeError(f"`{name}`: array dtype {array.dtype} is not supported; use uint8, uint16 or float in [0, 1]")


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}`: holds {np.count_nonzero(~np.isfinite(array))} NaN or infinite values; expected "
                         "finite pixel values")


def _unit_float_to_rgb(array: np.ndarray, name: str) -> PIL.Image.Image:
    """(H, W) or (H, W, C) float array in [0, 1], C in 1, 3 or 4 -> RGB PIL image (alpha over white)."""
    _check_finite(array, name)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"`{name}`: array of shape {tuple(array.shape)} is not an image; expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4)"
        )
    if array.shape[2] == 4:
        rgb, alpha = array[:, :, :3], array[:, :, 3:]
        array = rgb * alpha + (1.0 - alpha)
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return PIL.Image.fromarray(np.round(array * 255.0).astype(np.uint8), mode="RGB")


def _pil_to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit greyscale: PIL's convert("RGB") clips them; scale by the type's range instead.
        array = np.asarray(image)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = 1.0 if array.max() <= 1.0 else 255.0
        return _unit_float_to_rgb(np.clip(array.astype(np.float32) / top, 0.0, 1.0), name)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageInput, name: str = "image") -> PIL.Image.Image:
    """Turn any supported image input into an RGB PIL image.

    Args:
        image: a PIL image in any mode (RGB, RGBA, L, P, 16-bit, ...); a numpy array (H, W),
            (H, W, 1|3|4) of uint8, uint16 or float in [0, 1]; a tensor (3, H, W) or
            (1, 3, H, W) in [0, 1]; or a path to an image file. Transparency is composited
            over white.
        name: the argument the errors name (`image`, `control_image`, ...).

    Returns:
        An RGB `PIL.Image.Image`.
    """
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image, name)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"`{name}`: no file at {str(path)!r}")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                return _pil_to_rgb(opened, name)
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise ValueError(f"`{name}`: {str(path)!r} is not a readable image ({error})") from error
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"`{name}`: tensor of shape {tuple(image.shape)} is not an image; expected (C, H, W) or "
                "(1, C, H, W) with C in 1, 3, 4 and values in [0, 1]"
            )
        return _unit_float_to_rgb(array_to_unit_float(tensor.permute(1, 2, 0).numpy(), name), name)
    if isinstance(image, np.ndarray):
        return _unit_float_to_rgb(array_to_unit_float(image, name), name)
    raise TypeError(
        f"`{name}`: got {type(image).__name__}; expected a PIL image, numpy array, torch tensor or file path"
    )


def image_size(image: PIL.Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """The (height, width) an image-to-image call works at.

    Explicit `height`/`width` win; otherwise the reference's own size, rounded down to a
    multiple of the VAE factor (with a warning, since that changes the picture's size).
    """
    height = height if height is not None else image.height
    width = width if width is not None else image.width
    rounded = (height // multiple * multiple, width // multiple * multiple)
    if rounded != (height, width):
        warnings.warn(
            f"`image` of size {width}x{height} is resized to {rounded[1]}x{rounded[0]}, the nearest smaller "
            f"multiple of the VAE factor {multiple}; pass height= and width= to choose",
            stacklevel=3,
        )
    if min(rounded) < multiple:
        raise ValueError(f"`image`: size {width}x{height} is smaller than the VAE factor {multiple}")
    return rounded


def to_tensor(image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    """RGB PIL image -> (1, 3, height, width) float tensor in [-1, 1], resized with Lanczos if needed."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=PIL.Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def from_unit_array(array: np.ndarray, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """(B, H, W, 3) float32 in [0, 1] -> the `output_type` ("pil", "np" or "pt") `postprocess` gives."""
    if output_type == "np":
        return array
    if output_type == "pt":
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    return [PIL.Image.fromarray(frame) for frame in (array * 255).round().astype(np.uint8)]


def postprocess(decoded: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """VAE output (B, 3, H, W) in about [-1, 1] -> images.

    Returns:
        "pt": a float tensor (B, 3, H, W) in [0, 1]; "np": a float32 array (B, H, W, 3) in
        [0, 1]; "pil": a list of RGB PIL images.
    """
    images = (decoded / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(frame) for frame in (array * 255).round().astype(np.uint8)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` pixels wide (a longer word keeps its own line)."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def make_grid(images: list[PIL.Image.Image], rows: int | None = None, cols: int | None = None, pad: int = 2,
              background: tuple[int, int, int] = (255, 255, 255), row_labels: list[str] | None = None,
              col_labels: list[str] | None = None, scale: int = 1, font_size: int = 12) -> PIL.Image.Image:
    """Lay out images left to right, top to bottom, in a grid with `pad` pixels between cells.

    Args:
        images: PIL images (any sizes; each cell is as large as the largest image).
        rows, cols: the grid's shape; by default as square as the number of images allows.
        row_labels, col_labels: text written left of each row and above each column (wrapped
            to fit; row labels get a margin up to twice a cell's width).
        scale: an integer factor to enlarge every image by (nearest neighbour, so pixels stay
            sharp): small images, such as the bundled model's 64x64, read better at 2 or 3.
        font_size: the labels' size in pixels.

    Returns:
        One RGB `PIL.Image.Image`.
    """
    if not images:
        raise ValueError("`images`: got an empty list; expected at least one image")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"`scale`: got {scale!r}; expected an integer >= 1")
    count = len(images)
    if cols is None:
        cols = -(-count // rows) if rows else int(np.ceil(np.sqrt(count)))
    rows = rows or -(-count // cols)
    if rows * cols < count:
        raise ValueError(f"`rows`, `cols`: a {rows}x{cols} grid cannot hold {count} images")
    for name, labels, wanted in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != wanted:
            raise ValueError(f"`{name}`: got {len(labels)} labels for {wanted} {name[:3]}s; give one per {name[:3]}")
    if scale > 1:
        images = [image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST) for image in images]
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    left = top = 0
    if row_labels is not None or col_labels is not None:
        from PIL import ImageDraw

        font = _font(font_size)
        line_h = font_size + 2
        row_lines = [_wrap(label, font, 2 * cell_w) for label in row_labels or []]
        col_lines = [_wrap(label, font, cell_w) for label in col_labels or []]
        if row_lines:
            left = int(max(font.getlength(line) for lines in row_lines for line in lines)) + 2 * pad + 4
        if col_lines:
            top = max(len(lines) for lines in col_lines) * line_h + 2 * pad
    grid = PIL.Image.new("RGB", (left + cols * cell_w + (cols - 1) * pad, top + rows * cell_h + (rows - 1) * pad),
                         background)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        grid.paste(load_image(image), (left + col * (cell_w + pad), top + row * (cell_h + pad)))
    if left or top:
        draw = ImageDraw.Draw(grid)
        for row, lines in enumerate(row_lines):
            y = top + row * (cell_h + pad) + (cell_h - len(lines) * line_h) // 2
            for number, line in enumerate(lines):
                draw.text((pad, y + number * line_h), line, fill=(0, 0, 0), font=font)
        for col, lines in enumerate(col_lines):
            for number, line in enumerate(lines):
                x = left + col * (cell_w + pad) + (cell_w - font.getlength(line)) / 2
                draw.text((x, pad + number * line_h), line, fill=(0, 0, 0), font=font)
    return grid
