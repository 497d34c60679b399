"""The web page: a Gradio app over one pipeline (`ldm serve`, or `build_app(pipe).launch()`).

Only this module and its tabs (`web_inpaint`, `web_control`) import gradio (the `[web]` extra), so
`import ldm_pipeline` stays light. The app uses the pipeline's public API alone: one model in
memory serves the queued requests in turn; each image is served as a PNG carrying its recipe
(written by `PipelineOutput.save` into a temporary folder that is removed when the process ends);
bad input is shown in the page as an error message and the server goes on serving.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections import deque
from pathlib import Path


def _private_folder(prefix: str) -> Path:
    """A new temporary folder, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports: nothing leaves the machine
if "gradio" not in sys.modules and "GRADIO_TEMP_DIR" not in os.environ:
    # Gradio keeps uploads and served files in this folder (read when gradio is imported): ours, removed at exit
    os.environ["GRADIO_TEMP_DIR"] = str(_private_folder("ldm-web-uploads-"))

import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402

from ..adapters.fast import lora_settings  # noqa: E402
from ..guidance.composition import parse_regions  # noqa: E402
from ..sampling.schedulers import SCHEDULERS  # noqa: E402
from ..settings import default  # noqa: E402
from .web_control import (NO_CONTROLNET, control_arguments, control_controls, followed_picture,  # noqa: E402
                          drawn as _drawn, hires_arguments, hires_controls, whole as _whole)
from .runner import Runner, stop_on_sigterm  # noqa: E402
from .web_inpaint import inpaint_controls, picture_and_mask  # noqa: E402

MODEL_SCHEDULER = "model default"  # the scheduler the pipeline already has
RANDOM_SEED = -1
KEEP_CALLS = 64  # the output folders of this many recent calls stay on disk (Gradio copies what it serves)
PREVIEW_POLL = 0.5  # seconds between the page's looks at the latest preview


def _without_type_stubs(define):
    """Define a Gradio component class without Gradio writing a `.pyi` stub beside this module.

    Gradio's component metaclass writes `<module>.pyi` next to the source of every component
    subclass: into site-packages for an installed package (an error where that is read-only).
    """
    from gradio import component_meta

    write = getattr(component_meta, "create_or_modify_pyi", None)
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        return define()
    finally:
        if write is not None:
            component_meta.create_or_modify_pyi = write


def _define_reference_image():
    class _ReferenceImage(gr.Image):
        """`gr.Image` whose unreadable uploads (a damaged file, a text file named .png) become a readable message."""

        is_template = True  # drawn by the page as a plain gr.Image

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except gr.Error:
                raise
            except Exception:
                name = getattr(payload, "orig_name", None) or "the upload"
                raise gr.Error(f"image: {name!r} is not a readable image; upload a PNG, JPEG or WebP picture",
                               print_exception=False) from None

    return _ReferenceImage


_ReferenceImage = _without_type_stubs(_define_reference_image)


class _Runner(Runner):
    """The shared `Runner`, plus the page's side: each call's PNGs written into a private folder, and a
    session's stop button and live previews."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.folder = _private_folder("ldm-web-images-")
        self.recent: deque[Path] = deque()
        self.count = 0

    def latest_preview(self, request: gr.Request | None = None):
        """The session's newest live preview (its first image), once; no change when there is none."""
        picture = self.previews.pop(getattr(request, "session_hash", None), None)
        return picture if picture is not None else gr.skip()

    def stop(self, request: gr.Request | None = None):
        super().stop(getattr(request, "session_hash", None))

    def run(self, session: str | None, progress, scheduler: str, fast: bool = False,
            **arguments) -> tuple[list[str], int]:
        def on_step(done, total):
            progress((done, total), desc="denoising", unit="steps")

        with self.lock:
            try:
                result = self.draw(session, None if scheduler == MODEL_SCHEDULER else scheduler, on_step,
                                   fast=bool(fast), **arguments)
            except (ValueError, TypeError) as error:
                raise gr.Error(str(error), print_exception=False) from None
            self.count += 1
            out = self.folder / f"{self.count:06d}"
            paths = result.save(out)
            self.recent.append(out)
            while len(self.recent) > KEEP_CALLS:
                shutil.rmtree(self.recent.popleft(), ignore_errors=True)
        return [str(path) for path in paths], result.seeds[0]


def _settings(pipe):
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    regions_guidance = pipe.defaults.get("regions_guidance_scale")
    fast = lora_settings(pipe.defaults["fast_lora"]) if pipe.defaults.get("fast_lora") else {}
    return dict(steps=int(pipe.defaults["num_inference_steps"]), guidance=float(pipe.defaults["guidance_scale"]),
                size=int(size), multiple=int(pipe.vae_scale_factor),
                regions_guidance=None if regions_guidance is None else float(regions_guidance),
                fast_steps=fast.get("num_inference_steps"), fast_guidance=fast.get("guidance_scale", 1.0))


def fast_settings(on: bool, s: dict) -> tuple[int, float]:
    """The steps and guidance sliders' values once the fast box is ticked (the fast LoRA's) or cleared (the model's)."""
    return (s["fast_steps"], s["fast_guidance"]) if on else (s["steps"], s["guidance"])


def guidance_after_regions(regions: str, guidance: float, plain: float, for_regions: float | None) -> float:
    """The guidance slider's value once the regions box has changed.

    Boxes typed in while the slider holds the model's plain guidance move it to the model's guidance
    for parts in regions; boxes cleared while it holds that move it back. A value the user chose stays.
    """
    if for_regions is None:
        return guidance
    boxes = bool((regions or "").strip())
    if boxes and guidance == plain:
        return for_regions
    if not boxes and guidance == for_regions:
        return plain
    return guidance


def build_app(pipe, title: str = "ldm-pipeline") -> gr.Blocks:
    """A Gradio app drawing with `pipe`: text-to-image (with the hires fix), image-to-image, inpainting and
    ControlNet, a gallery of PNGs with recipes.

    Args:
        pipe: a `LatentDiffusionPipeline` (any model it loads). Calls run one at a time. The Control tab
            draws with the ControlNet `pipe.controlnet` holds when the app is built (the other tabs
            draw without it); without one, it says how to load one.
        title: the page's title.

    Returns:
        The `gr.Blocks`, queued; `.launch()` serves it (in a notebook too). Its text-to-image event is
        the API endpoint `/generate`: `Client(url).predict("a red circle", api_name="/generate")`
        returns (gallery, seed used); every input but the prompt has a default. Its last inputs are the
        hires fix: `hires_fix` (off), `hires_scale` (2), `hires_upscaler` ("latent" or "lanczos"),
        `hires_steps` (0: the call's steps) and `hires_strength` (0.7), then `fast`: draw with the model's
        LCM-LoRA (`enable_fast`; its steps and guidance are the sliders' values when ticked). Every event
        below ends with `fast` too.
        `/transform` is image-to-image: (reference picture, strength, then `/generate`'s inputs).
        `/inpaint` is inpainting: (editor value, strength, mask blur, masked content, inpaint only
        masked, padding, then `/generate`'s inputs), where the editor value is a dict
        `{"background": handle_file("picture.png"), "layers": [handle_file("strokes.png")], "composite": None}`
        and every pixel of a layer with alpha above 0 is repainted; e.g.
        `client.predict(value, prompt="a green circle", seed=3, api_name="/inpaint")`. The whole picture
        is drawn at its own size, and outside the mask and its blur band it comes back exactly; with
        inpaint only masked, the area around the mask (plus padding) is drawn at width x height.
        `/control` draws with the pipeline's ControlNet: (control picture, preprocessor "none" |
        "canny" | "scribble", control scale, start, end, guess mode, then `/generate`'s inputs up to the
        number of images, a sketchpad drawing used when the picture is None, composition, regions).
    """
    runner = _Runner(pipe)
    s = _settings(pipe)
    scheduler_names = [MODEL_SCHEDULER, *SCHEDULERS]

    net = pipe.controlnet  # the Control tab's

    # The inputs' defaults are the components' values (shown by `Client.view_api()`), not Python defaults.
    def generate(prompt: str, negative_prompt: str, steps: float, guidance: float, scheduler: str, width: float,
                 height: float, seed: float, num_images: float, composition: bool = False, regions: str = "",
                 hires_fix: bool = False, hires_scale: float = default("hires_scale"),
                 hires_upscaler: str = default("hires_upscaler"), hires_steps: float = 0,
                 hires_strength: float = default("hires_strength"), fast: bool = False, request: gr.Request = None,
                 progress=gr.Progress()):
        return _draw(prompt, negative_prompt, steps, guidance, scheduler, width, height, seed, num_images,
                     composition, regions, fast, request, progress,
                     **hires_arguments(hires_fix, hires_scale, hires_upscaler, hires_steps, hires_strength))

    def transform(reference, strength: float, prompt: str, negative_prompt: str, steps: float, guidance: float,
                  scheduler: str, width: float, height: float, seed: float, num_images: float, drawing=None,
                  composition: bool = False, regions: str = "", fast: bool = False, request: gr.Request = None,
                  progress=gr.Progress()):
        if reference is None:  # then the drawing, if anything was drawn
            reference = _drawn(drawing)
        if reference is None:
            raise gr.Error("image: upload or draw a reference picture for image-to-image", print_exception=False)
        return _draw(prompt, negative_prompt, steps, guidance, scheduler, width, height, seed, num_images,
                     composition, regions, fast, request, progress, image=reference, strength=float(strength))

    def inpaint(edited, strength: float, mask_blur: float, masked_content: str, only_masked: bool, padding: float,
                prompt: str, negative_prompt: str, steps: float, guidance: float, scheduler: str, width: float,
                height: float, seed: float, num_images: float, composition: bool = False, regions: str = "",
                fast: bool = False, request: gr.Request = None, progress=gr.Progress()):
        picture, mask = picture_and_mask(edited)
        if not only_masked:  # the whole picture, drawn at its own size
            width = height = None
        return _draw(prompt, negative_prompt, steps, guidance, scheduler, width, height, seed, num_images,
                     composition, regions, fast, request, progress, image=picture, mask_image=mask,
                     strength=float(strength), mask_blur=_whole("mask blur", mask_blur), masked_content=masked_content,
                     padding_mask_crop=_whole("padding", padding) if only_masked else None)

    def control(control_picture, preprocessor: str, control_scale: float, control_start: float,
                control_end: float, guess_mode: bool, prompt: str, negative_prompt: str, steps: float,
                guidance: float, scheduler: str, width: float, height: float, seed: float, num_images: float,
                drawing=None, composition: bool = False, regions: str = "", fast: bool = False,
                request: gr.Request = None, progress=gr.Progress()):
        if net is None:
            raise gr.Error(NO_CONTROLNET, print_exception=False)
        picture = followed_picture(control_picture if control_picture is not None else _drawn(drawing), preprocessor)
        return _draw(prompt, negative_prompt, steps, guidance, scheduler, width, height, seed, num_images,
                     composition, regions, fast, request, progress,
                     **control_arguments(net, picture, control_scale, control_start, control_end, guess_mode))

    def _draw(prompt, negative_prompt, steps, guidance, scheduler, width, height, seed, num_images, composition,
              regions, fast, request, progress, **picture):
        if not isinstance(prompt, str) or not prompt.strip():
            raise gr.Error(f"prompt: got {prompt!r}; type what to draw", print_exception=False)
        if scheduler not in scheduler_names:
            raise gr.Error(f"scheduler: got {scheduler!r}; expected one of {', '.join(scheduler_names)}",
                           print_exception=False)
        seed = _whole("seed", seed)
        arguments = dict(prompt=prompt, negative_prompt=negative_prompt or None,
                         num_inference_steps=_whole("steps", steps), guidance_scale=float(guidance),
                         width=None if width is None else _whole("width", width),
                         height=None if height is None else _whole("height", height),
                         num_images_per_prompt=_whole("number of images", num_images),
                         seed=None if seed == RANDOM_SEED else seed, prompt_composition=bool(composition))
        try:
            arguments["regions"] = parse_regions(regions or "")
        except ValueError as error:
            raise gr.Error(f"regions: {error}", print_exception=False) from None
        arguments.update(picture)  # image=, strength=, mask_image=, ..., control_image=, ..., hires_fix=, ...
        session = getattr(request, "session_hash", None)
        return runner.run(session, progress, scheduler, fast=bool(fast), **arguments)

    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {title}\nLatent diffusion: text-to-image, image-to-image, inpainting and ControlNet. "
                    "Each image "
                    "downloads as a PNG carrying its recipe (`ldm generate --from image.png` draws it again).")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle in the top left",
                                    elem_id="prompt")
                negative = gr.Textbox("", label="Negative prompt", lines=1, elem_id="negative-prompt")
                with gr.Row():
                    steps = gr.Slider(1, 150, value=s["steps"], step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=s["guidance"], step=0.5, label="Guidance", elem_id="guidance")
                fast = gr.Checkbox(pipe.fast, label=f"Fast: the model's LCM-LoRA ({s['fast_steps']} step(s), guidance "
                                   f"{s['fast_guidance']:g}; a fused LoRA, so compile() keeps working)",
                                   visible=s["fast_steps"] is not None, elem_id="fast")
                with gr.Row():
                    scheduler = gr.Dropdown(scheduler_names, value=MODEL_SCHEDULER, label="Scheduler",
                                            elem_id="scheduler")
                    num_images = gr.Number(default("num_images_per_prompt"), precision=0, minimum=1, label="Number of images", elem_id="num-images")
                with gr.Row():
                    width = gr.Number(s["size"], precision=0, step=s["multiple"], label="Width", elem_id="width")
                    height = gr.Number(s["size"], precision=0, step=s["multiple"], label="Height", elem_id="height")
                    seed = gr.Number(RANDOM_SEED, precision=0, label="Seed (-1: random)", elem_id="seed")
                with gr.Accordion("Composed prompts (AND) and regions", open=False):
                    composition = gr.Checkbox(False, label="Read AND as composed parts, each guiding on its own "
                                              "('A AND B :0.5'; AUTOMATIC1111's AND)", elem_id="composition")
                    hint = "" if s["regions_guidance"] is None else \
                        f"; this model draws parts in regions best at guidance {s['regions_guidance']:g}, " \
                        "which the guidance slider takes when boxes are typed in"
                    regions = gr.Textbox("", label="Regions: a box per AND part, ';' between parts",
                                         placeholder="0,0,0.5,0.5; 0.5,0.5,1,1", elem_id="regions",
                                         info="left,top,right,bottom as fractions of the image, or 'all'" + hint)
                with gr.Tab("Text to image"):
                    hires = hires_controls()  # the hires fix's accordion
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Tab("Image to image"):
                    with gr.Tab("Upload"):
                        reference = _ReferenceImage(label="Reference picture", type="filepath", image_mode=None,
                                                    sources=["upload", "clipboard"], elem_id="reference")
                    with gr.Tab("Draw"):
                        canvas = max(s["size"], 256)
                        drawing = gr.Sketchpad(PIL.Image.new("RGB", (canvas, canvas), "white"), type="pil",
                                               canvas_size=(canvas, canvas), label="Draw a reference (used when "
                                               "no picture is uploaded)", elem_id="drawing")
                    strength = gr.Slider(0.05, 1, value=default("strength"), step=0.05, label="Strength", elem_id="strength")
                    go_image = gr.Button("Transform", variant="primary", elem_id="transform")
                with gr.Tab("Inpaint"):
                    paint = inpaint_controls(s["size"])  # the editor, the inpainting settings, the button
                with gr.Tab("Control"):
                    steer = control_controls(s["size"], _ReferenceImage, net)  # picture, settings, button
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                live = gr.Image(label="Live preview (the predicted image while drawing; cheap, not exact)",
                                type="pil", interactive=False, height=160, elem_id="preview")
                used = gr.Number(label="Seed used", info="image i of the call drew from this seed + i; each image "
                                 "downloads as a PNG carrying its recipe", precision=0, interactive=False,
                                 elem_id="seed-used")
        settings = [prompt, negative, steps, guidance, scheduler, width, height, seed, num_images]
        fast.change(lambda on: fast_settings(on, s), fast, [steps, guidance], queue=False, api_visibility="private")
        one_model = dict(concurrency_id="model", concurrency_limit=1)  # every drawing event waits in one line
        parts = [composition, regions]
        upscale = [hires.fix, hires.scale, hires.upscaler, hires.steps, hires.strength]
        text_run = go.click(generate, [*settings, *parts, *upscale, fast], [gallery, used], api_name="generate",
                            **one_model)
        submit_run = prompt.submit(generate, [*settings, *parts, *upscale, fast], [gallery, used],
                                   api_visibility="private", **one_model)
        image_run = go_image.click(transform, [reference, strength, *settings, drawing, *parts, fast], [gallery, used],
                                   api_name="transform", **one_model)
        inpaint_run = paint.button.click(inpaint, [paint.editor, paint.strength, paint.mask_blur, paint.masked_content,
                                                   paint.only_masked, paint.padding, *settings, *parts, fast],
                                         [gallery, used], api_name="inpaint", **one_model)
        control_run = steer.button.click(control, [steer.picture, steer.preprocessor, steer.scale, steer.start,
                                                   steer.end, steer.guess_mode, *settings, steer.drawing, *parts,
                                                   fast],
                                         [gallery, used], api_name="control", **one_model)
        stop.click(runner.stop, None, None, cancels=[text_run, submit_run, image_run, inpaint_run, control_run],
                   queue=False, api_visibility="private")
        regions.change(lambda boxes, value: guidance_after_regions(boxes, value, s["guidance"], s["regions_guidance"]),
                       [regions, guidance], guidance, queue=False, api_visibility="private")
        gr.Timer(PREVIEW_POLL).tick(runner.latest_preview, None, live, queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    demo.ldm_runner = runner  # its folder holds the served PNGs (removed at exit)
    return demo


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, **launch) -> None:
    """Serve `build_app(pipe)` until interrupted (what `ldm serve` runs)."""
    stop_on_sigterm()
    build_app(pipe).launch(server_name=host, server_port=port, show_error=True, **launch)
