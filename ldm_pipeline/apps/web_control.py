"""The web page's hires fix settings and its Control tab (see `web.build_app`). Imported by `web` only.

The hires fix is an accordion of settings that text-to-image passes to `pipe(..., hires_fix=True, ...)`.
The Control tab steers a drawing with the ControlNet the pipeline holds (`ldm serve --controlnet PATH`,
or `pipe.controlnet`): a control picture, uploaded or drawn on a sketchpad, optionally made into Canny
edges or a scribble first, goes to `pipe(prompt, control_image=picture, ...)`.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import PIL.Image

from ..conditioning import preprocess
from ..settings import default

UPSCALERS = ("latent", "lanczos")  # the hires upscalers the page offers (model files: the CLI and Python)
PREPROCESSORS = ("none", *preprocess.PREPROCESSORS)
NO_CONTROLNET = "controlnet: start the server with --controlnet PATH"


def whole(name: str, value) -> int:
    """Gradio's number boxes send floats; the pipeline wants integers (and names a bad one itself)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise gr.Error(f"{name}: got {value!r}; expected a whole number", print_exception=False)


def drawn(drawing) -> PIL.Image.Image | None:
    """The sketchpad's picture, or None when nothing was drawn on it (a canvas of one colour)."""
    picture = drawing.get("composite") if isinstance(drawing, dict) else None
    if picture is None:
        return None
    low, high = zip(*picture.convert("RGB").getextrema())
    return None if low == high else picture


# -- hires fix ------------------------------------------------------------------------------------


def hires_controls() -> SimpleNamespace:
    """The "Hires fix" accordion: whether, the upscale, the upscaler, the refining steps and strength."""
    with gr.Accordion("Hires fix", open=False):
        fix = gr.Checkbox(default("hires_fix"), label="Hires fix: draw at the width and height above, upscale, "
                          "then refine by image-to-image", elem_id="hires-fix")
        with gr.Row():
            scale = gr.Slider(1, 4, value=default("hires_scale"), step=0.05, label="Upscale by",
                              elem_id="hires-scale")
            upscaler = gr.Dropdown(list(UPSCALERS), value=default("hires_upscaler"), label="Upscaler",
                                   info="latent: in latent space; lanczos: decoded, resized, encoded again",
                                   elem_id="hires-upscaler")
        with gr.Row():
            steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: the steps above)",
                              elem_id="hires-steps")
            strength = gr.Slider(0.05, 1, value=default("hires_strength"), step=0.05, label="Denoising strength",
                                 elem_id="hires-strength")
    return SimpleNamespace(fix=fix, scale=scale, upscaler=upscaler, steps=steps, strength=strength)


def hires_arguments(fix: bool, scale: float, upscaler: str, steps: float, strength: float) -> dict:
    """The pipeline's hires arguments from the accordion's values; none when the hires fix is off."""
    if not fix:
        return {}
    if upscaler not in UPSCALERS:
        raise gr.Error(f"hires upscaler: got {upscaler!r}; expected one of {', '.join(UPSCALERS)}",
                       print_exception=False)
    steps = whole("hires steps", steps)
    return dict(hires_fix=True, hires_scale=float(scale), hires_upscaler=upscaler, hires_steps=steps or None,
                hires_strength=float(strength))


# -- ControlNet ------------------------------------------------------------------------------------


def net_name(net) -> str:
    """What the page calls the pipeline's ControlNet(s)."""
    nets = net if isinstance(net, (list, tuple)) else [net]
    return ", ".join(getattr(n, "ldm_name", None) or n.config.get("_name_or_path") or "controlnet" for n in nets)


def control_controls(size: int, image_class, net) -> SimpleNamespace:
    """The Control tab's components (call inside a `gr.Tab`): the picture (uploaded or drawn), the
    preprocessor, the net's scale, start and end, guess mode, a view of what the net follows, the button.

    `image_class` is the page's image component (unreadable uploads become messages); `net` is the
    pipeline's ControlNet (or list), or None: then the tab says how to load one.
    """
    if net is None:
        gr.Markdown("No ControlNet is loaded: start the server with `ldm serve --controlnet PATH` (a diffusers "
                    "ControlNet folder, a Hub id or an original `.safetensors` file).", elem_id="control-missing")
    else:
        gr.Markdown(f"ControlNet: `{net_name(net)}`. The picture steers the drawing (edges, scribbles, depth, "
                    "pose, ... as the net was trained on).", elem_id="control-net")
    with gr.Tab("Upload"):
        picture = image_class(label="Control picture", type="pil", image_mode=None,
                              sources=["upload", "clipboard"], elem_id="control-picture")
    with gr.Tab("Draw"):
        canvas = max(size, 256)
        drawing = gr.Sketchpad(PIL.Image.new("RGB", (canvas, canvas), "white"), type="pil",
                               canvas_size=(canvas, canvas), label="Draw a control picture (used when none is "
                               "uploaded; the scribble preprocessor makes the strokes white on black)",
                               elem_id="control-drawing")
    preprocessor = gr.Radio(list(PREPROCESSORS), value="none", label="Preprocessor",
                            info="none: the picture as it is; canny: its edges (OpenCV); scribble: dark strokes "
                            "on light (or light on dark) as white on black", elem_id="control-preprocessor")
    with gr.Row():
        scale = gr.Slider(0, 2, value=default("controlnet_conditioning_scale"), step=0.05, label="Control scale",
                          elem_id="control-scale")
        guess_mode = gr.Checkbox(default("guess_mode"), label="Guess mode",
                                 info="the net sees the prompt's copy only: the picture leads",
                                 elem_id="guess-mode")
    with gr.Row():
        start = gr.Slider(0, 1, value=default("control_guidance_start"), step=0.05, label="Start (share of steps)",
                          elem_id="control-start")
        end = gr.Slider(0, 1, value=default("control_guidance_end"), step=0.05, label="End (share of steps)",
                        elem_id="control-end")
    seen = gr.Image(label="What the net follows", type="pil", interactive=False, height=160,
                    elem_id="control-seen")
    button = gr.Button("Draw with control", variant="primary", elem_id="control")
    controls = SimpleNamespace(picture=picture, drawing=drawing, preprocessor=preprocessor, scale=scale,
                               guess_mode=guess_mode, start=start, end=end, seen=seen, button=button)

    def show(picture, drawing, preprocessor):
        try:
            return followed_picture(picture if picture is not None else drawn(drawing), preprocessor)
        except gr.Error:
            return None

    for event in (picture.change, drawing.change, preprocessor.change):
        event(show, [picture, drawing, preprocessor], seen, queue=False, api_visibility="private")
    return controls


def followed_picture(picture, preprocessor: str) -> PIL.Image.Image:
    """The picture the net follows: the one given, or its Canny edges or scribble.

    Raises:
        gr.Error naming the control image when there is none, or the preprocessor when it cannot run.
    """
    if picture is None:
        raise gr.Error("control_image: upload or draw a control picture", print_exception=False)
    if preprocessor not in PREPROCESSORS:
        raise gr.Error(f"preprocessor: got {preprocessor!r}; expected one of {', '.join(PREPROCESSORS)}",
                       print_exception=False)
    if preprocessor == "none":
        return picture
    try:
        return preprocess.preprocess(preprocessor, picture)
    except (ImportError, ValueError) as error:
        raise gr.Error(f"preprocessor: {error}", print_exception=False) from None


def control_arguments(net, picture, scale: float, start: float, end: float, guess_mode: bool) -> dict:
    """The pipeline's ControlNet arguments: every net of the pipeline follows the picture."""
    if net is None:
        raise gr.Error(NO_CONTROLNET, print_exception=False)
    count = len(net) if isinstance(net, (list, tuple)) else 1
    return dict(control_image=picture if count == 1 else [picture] * count,
                controlnet_conditioning_scale=float(scale), control_guidance_start=float(start),
                control_guidance_end=float(end), guess_mode=bool(guess_mode))
