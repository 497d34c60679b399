"""Control pictures from ordinary ones: Canny edges and scribbles, as edge and scribble ControlNets take them.

Both return RGB pictures of the input's size with white lines on black. Canny edges come from
OpenCV (the `[controlnet]` extra, `opencv-python-headless`). Pictures made by other preprocessors,
such as `controlnet_aux`'s (depth, pose, lineart), are PIL images already and go to
`control_image=` as they are.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from ..images import ImageInput, load_image

PREPROCESSORS = ("canny", "scribble")


def canny(image: ImageInput, low: int = 100, high: int = 200) -> PIL.Image.Image:
    """Canny's edge detector (1986) on the picture's grey levels: one-pixel white outlines on black.

    Args:
        low, high: the hysteresis thresholds on the gradient (0-255 grey levels; OpenCV's meaning).
    """
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low < high):
        raise ValueError(f"`low`, `high`: got {low!r}, {high!r}; expected integers with 0 <= low < high")
    try:
        import cv2
    except ImportError:
        raise ImportError("canny: needs OpenCV; pip install 'ldm-pipeline[controlnet]' (opencv-python-headless)") \
            from None
    grey = np.asarray(load_image(image).convert("L"))
    edges = cv2.Canny(grey, low, high)
    return PIL.Image.fromarray(edges).convert("RGB")


def scribble(image: ImageInput, threshold: int = 128) -> PIL.Image.Image:
    """A drawn picture (dark strokes on a light ground, or light on dark) as white strokes on black."""
    if not (isinstance(threshold, int) and 0 < threshold < 256):
        raise ValueError(f"`threshold`: got {threshold!r}; expected an integer grey level in 1-255")
    grey = np.asarray(load_image(image).convert("L"))
    strokes = grey < threshold if grey.mean() >= threshold else grey >= threshold  # the minority is the drawing
    return PIL.Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8)).convert("RGB")


def preprocess(name: str, image: ImageInput) -> PIL.Image.Image:
    """`canny` or `scribble` by name (what `ldm generate --control-preprocess` runs)."""
    if name not in PREPROCESSORS:
        raise ValueError(f"`preprocess`: got {name!r}; expected one of {list(PREPROCESSORS)}")
    return canny(image) if name == "canny" else scribble(image)
