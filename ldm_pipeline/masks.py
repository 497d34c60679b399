"""Masks for inpainting: what to repaint, read from anything a user may hand us, and the pixel work
around it (the soft paste-back band, the crop around the mask, filling a hole, extending a canvas).

White means repaint, black keep. A mask is read as one grey level per pixel: a PIL image in any
mode (RGBA: the grey level where opaque, keep where transparent, so a brush layer over nothing
works), a numpy array (H, W) or (H, W, 1|3|4) of uint8, uint16 or floats in [0, 1], a tensor
(1, H, W) or (H, W) in [0, 1], or a file path. The model sees it binarised at 50 % grey, as
diffusers does; `mask_blur` softens only the band where the result is pasted over the picture.
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch

from .images import ImageInput, array_to_unit_float, load_image

MASKED_CONTENT = ("original", "fill", "latent_noise", "latent_nothing")  # AUTOMATIC1111's "masked content"


def load_mask(mask: ImageInput, size: tuple[int, int] | None, image: str = "image") -> PIL.Image.Image:
    """Any supported mask input -> a binary "L" image (255 = repaint) of `size` (width, height), checked.

    Args:
        size: the picture's size, which the mask must have; None: any size.
        image: the picture's argument name, for the message.

    Raises:
        ValueError: naming `mask_image`, when its size differs from the image's or nothing is white.
    """
    grey = _grey(mask)
    if size is not None and grey.size != size:
        raise ValueError(f"`mask_image`: {grey.width}x{grey.height}, but `{image}` is {size[0]}x{size[1]}; expected "
                         f"a mask of the {image}'s size")
    binary = grey.point(lambda v: 255 if v >= 128 else 0)
    if binary.getextrema()[1] == 0:
        raise ValueError("`mask_image`: no pixel is white (>= 50 % grey), so nothing would be repainted; white marks "
                         "what to repaint, black what to keep")
    return binary


def _grey(mask: ImageInput) -> PIL.Image.Image:
    if isinstance(mask, PIL.Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32)
            grey = np.asarray(PIL.Image.fromarray(rgba[..., :3].astype(np.uint8)).convert("L"), dtype=np.float32)
            return PIL.Image.fromarray(np.round(grey * rgba[..., 3] / 255.0).astype(np.uint8), mode="L")
        return mask if mask.mode == "L" else mask.convert("L")
    if isinstance(mask, (str, os.PathLike)):
        return _grey(_open(mask))
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().float().cpu()
        tensor = tensor[0] if tensor.ndim == 3 and tensor.shape[0] == 1 else tensor
        if tensor.ndim != 2:
            raise ValueError(f"`mask_image`: tensor of shape {tuple(mask.shape)} is not a mask; expected (H, W) or "
                             "(1, H, W) with values in [0, 1]")
        mask = tensor.numpy()
    if isinstance(mask, np.ndarray):
        return _grey(_from_array(mask))
    raise TypeError(f"`mask_image`: got {type(mask).__name__}; expected a PIL image, numpy array, torch tensor or "
                    "file path")


def _from_array(array: np.ndarray) -> PIL.Image.Image:
    unit = array_to_unit_float(array, "mask_image")
    if unit.ndim == 3 and unit.shape[2] == 1:
        unit = unit[..., 0]
    if unit.ndim not in (2, 3) or (unit.ndim == 3 and unit.shape[2] not in (3, 4)):
        raise ValueError(f"`mask_image`: array of shape {tuple(array.shape)} is not a mask; expected (H, W), "
                         "(H, W, 1), (H, W, 3) or (H, W, 4)")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[unit.shape[2] if unit.ndim == 3 else 2]
    return PIL.Image.fromarray(np.round(unit * 255.0).astype(np.uint8), mode=mode)


def _open(path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except FileNotFoundError:
        raise ValueError(f"`mask_image`: no file at {str(path)!r}") from None
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"`mask_image`: {str(path)!r} is not a readable image ({error})") from error


def soft(mask: PIL.Image.Image, blur: int) -> np.ndarray:
    """The paste-back weights (H, W) in [0, 1]: the binary mask blurred by a Gaussian of `blur` pixels."""
    if blur > 0:
        mask = mask.filter(PIL.ImageFilter.GaussianBlur(blur))
    return np.asarray(mask, dtype=np.float32) / 255.0


def paste(generated: np.ndarray, original: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) generated pixels over the original (H, W, 3), all in [0, 1], by the weights (H, W).

    Where a weight is 0 the result is the original exactly: `original * 1 + generated * 0`.
    """
    w = weights[None, :, :, None]
    return np.where(w > 0, original[None] * (1 - w) + generated * w, original[None])


def crop_box(mask: PIL.Image.Image, padding: int, aspect: float) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) around the mask's white pixels plus `padding`, widened to
    `aspect` (width / height) and kept inside the image: what "inpaint only the masked area" draws."""
    left, top, right, bottom = mask.getbbox()
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, mask.width), min(bottom + padding, mask.height)
    width, height = right - left, bottom - top
    if width / height < aspect:  # too narrow: widen around its centre, then shift back inside the image
        width = min(round(height * aspect), mask.width)
        left = min(max((left + right - width) // 2, 0), mask.width - width)
        right = left + width
    else:
        height = min(round(width / aspect), mask.height)
        top = min(max((top + bottom - height) // 2, 0), mask.height - height)
        bottom = top + height
    return left, top, right, bottom


def fill(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """The image with its masked pixels replaced by the colours around them (A1111's "fill").

    Normalised convolution at falling scales: each pass blurs the known pixels and their weights alike,
    and a hole pixel takes the colour of the finest pass that reaches it, so the middle of a hole has
    the mean of what surrounds it and its edges the colours just beside them.
    """
    hole = np.asarray(mask, dtype=np.float32) >= 128
    if hole.all() or not hole.any():
        return image
    known = (~hole).astype(np.float32)
    pixels = np.asarray(image, dtype=np.float32)
    result = pixels.copy()
    for radius in (max(image.size), 16, 4, 1):
        weight = _blur(known, radius)
        reached = hole & (weight > 1e-3)
        colour = np.stack([_blur(pixels[..., c] * known, radius) for c in range(3)], axis=-1)
        result[reached] = colour[reached] / weight[reached, None]
    return PIL.Image.fromarray(np.clip(np.round(result), 0, 255).astype(np.uint8), mode="RGB")


def _blur(channel: np.ndarray, radius: int) -> np.ndarray:
    """A box blur of (2 radius + 1) pixels, zeros beyond the edges (PIL's box blur takes no float images)."""
    from scipy.ndimage import uniform_filter

    return uniform_filter(channel, size=2 * radius + 1, mode="constant")


def outpaint(image: ImageInput, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
             multiple: int = 8) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Extend a picture's canvas for outpainting: the image and mask to pass to `pipe(image=, mask_image=)`.

    Args:
        left, top, right, bottom: pixels to add on each side (>= 0, at least one > 0).
        multiple: the canvas grows on the right and bottom until both sides are multiples of this
            (the VAE factor, 8 for Stable Diffusion).

    Returns:
        `(canvas, mask)`: the new area filled with the colours at the picture's edges (`fill`), and
        a mask white over the new area.
    """
    margins = dict(left=left, top=top, right=right, bottom=bottom)
    for name, value in margins.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}`: got {value!r}; expected an integer >= 0 (pixels to add on that side)")
    if not any(margins.values()):
        raise ValueError("`left`, `top`, `right`, `bottom`: all 0; give at least one side to extend")
    picture = load_image(image)
    width, height = picture.width + left + right, picture.height + top + bottom
    width, height = -(-width // multiple) * multiple, -(-height // multiple) * multiple
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(picture, (left, top))
    mask = PIL.Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + picture.width, top + picture.height))
    return fill(canvas, mask), mask
