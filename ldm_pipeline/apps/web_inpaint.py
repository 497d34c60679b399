"""The web page's Inpaint tab (see `web.build_app`): an image editor whose painted strokes are the mask.

The user uploads a picture into a `gr.ImageEditor` and paints over what to repaint; every painted
pixel of any layer (alpha above 0) is white in the mask, the rest black. Imported by `web` only.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
import PIL.Image

from ..masks import MASKED_CONTENT
from ..settings import default

ONLY_MASKED_PADDING = 32  # pixels kept around the mask when "inpaint only masked" is ticked
BRUSH = ("#ff00ff", 0.6)  # the strokes' colour on the page; the mask takes their alpha, not their colour


def _image(value) -> PIL.Image.Image:
    """An editor image (PIL, numpy array or file path, after Gradio's preprocessing) as a PIL image."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return PIL.Image.fromarray(value)
    with PIL.Image.open(value) as opened:
        return opened.copy()


def _opaque(picture: PIL.Image.Image) -> PIL.Image.Image | None:
    """The picture as RGB, transparent parts on white; None for a wholly transparent canvas (nothing uploaded)."""
    if "A" not in picture.getbands() and "transparency" not in picture.info:
        return picture.convert("RGB")
    rgba = picture.convert("RGBA")
    if rgba.getextrema()[3][1] == 0:
        return None
    return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def picture_and_mask(edited) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The editor's value (a dict: background, layers, composite) -> (picture, mask).

    Returns:
        The uploaded picture (RGB) and the mask ("L", the picture's size): 255 where any layer is
        painted, 0 elsewhere.

    Raises:
        gr.Error naming the image when no picture was uploaded, naming the mask when nothing is painted.
    """
    background = edited.get("background") if isinstance(edited, dict) else None
    picture = _opaque(_image(background)) if background is not None else None
    if picture is None:
        raise gr.Error("image: upload the picture to inpaint, then paint the area to repaint",
                       print_exception=False)
    painted = np.zeros((picture.height, picture.width), dtype=bool)
    for layer in edited.get("layers") or []:
        if layer is None:
            continue
        alpha = _image(layer).convert("RGBA").getchannel("A")
        if alpha.size != picture.size:  # a layer of another size covers the picture, stretched
            alpha = alpha.resize(picture.size, resample=PIL.Image.NEAREST)
        painted |= np.asarray(alpha) > 0
    if not painted.any():
        raise gr.Error("mask: paint the area to repaint over the picture (nothing is painted)",
                       print_exception=False)
    return picture, PIL.Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L")


def inpaint_controls(size: int) -> SimpleNamespace:
    """The tab's components (call inside a `gr.Tab`): the editor, the inpainting settings and the button.

    `size` is the model's image size; the brush's radius starts at a sixteenth of it (the user can change it).
    """
    brush = gr.Brush(default_size=max(1, size // 16), colors=[BRUSH], default_color=BRUSH)
    editor = gr.ImageEditor(label="Picture: upload it, then paint over the area to repaint", type="pil",
                            image_mode="RGBA", sources=["upload", "clipboard"], transforms=(), brush=brush,
                            elem_id="inpaint-editor")
    strength = gr.Slider(0.05, 1, value=default("strength"), step=0.05, label="Strength",
                         elem_id="inpaint-strength")
    mask_blur = gr.Slider(0, 64, value=default("mask_blur"), step=1, label="Mask blur (pixels)",
                          info="the result is pasted over the picture through the mask blurred by this much",
                          elem_id="mask-blur")
    masked_content = gr.Radio(list(MASKED_CONTENT), value=default("masked_content"), label="Masked content",
                              info="what the painted area starts from: the picture, the colours around it, "
                              "noise or nothing", elem_id="masked-content")
    with gr.Row():
        only_masked = gr.Checkbox(default("padding_mask_crop") is not None, label="Inpaint only masked",
                                  info="draw the area around the mask at the width and height above and paste "
                                  "it back; otherwise the whole picture is drawn at its own size",
                                  elem_id="only-masked")
        padding = gr.Slider(0, 256, value=ONLY_MASKED_PADDING, step=1, label="Only masked padding (pixels)",
                            elem_id="only-masked-padding")
    button = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
    return SimpleNamespace(editor=editor, strength=strength, mask_blur=mask_blur, masked_content=masked_content,
                           only_masked=only_masked, padding=padding, button=button)
