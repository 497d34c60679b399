"""One pipeline serving many requests: calls run one at a time, and each can be watched and stopped.

The web page (`web`) and the HTTP API (`api`) share one `Runner`, so that a request of either waits
for the other's call to end, and switching the model (`Runner.switch`) waits for the call in progress.
Imports neither gradio nor fastapi.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import PIL.Image

PREVIEWS = 10  # about this many live previews of the predicted image per call (see sampling.previews)


@dataclass
class Progress:
    """The call now running, for a progress report: steps done of steps to run, and the newest preview."""

    session: str | None
    total: int  # denoising steps the call runs
    step: int = 0  # steps done
    preview: PIL.Image.Image | None = None  # the first image of the newest live preview
    started: float = field(default_factory=time.monotonic)


class Runner:
    """Runs calls on one pipeline, one at a time; a session can stop its own call.

    Attributes:
        pipe: the pipeline (replaced by `switch`).
        lock: held for the whole of a call (re-entrant: a caller may hold it around several calls and
            what it does with their results).
        running: the session of the call now running, or None.
        progress: the call now running (`Progress`), or None.
        previews: session -> its newest live preview not yet shown by the page.
        last_steps_run: the denoising steps the last call ran (fewer when stopped).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.lock = threading.RLock()
        self.running: str | None = None
        self.progress: Progress | None = None
        self.stop_requested: set[str] = set()
        self.last_steps_run: int | None = None
        self.previews: dict[str | None, PIL.Image.Image] = {}

    def stop(self, session: str | None) -> bool:
        """Ask the call of `session` to stop after its current step; False when it is not running."""
        if session is not None and session == self.running:
            self.stop_requested.add(session)
            return True
        return False

    def draw(self, session: str | None, scheduler: str | None = None, on_step=None, fast: bool | None = None,
             **arguments):
        """`pipe(**arguments)` with `scheduler` (our name; None: the pipeline's own) and fast mode on or off
        (`enable_fast`, the model's own LoRA; None: as the pipeline is) for this call only.

        `on_step(done, total)` follows the denoising steps. Returns the `PipelineOutput`; the pipeline's
        ValueError and TypeError pass through (the caller words them for its users).
        """
        steps = arguments.get("num_inference_steps") or self.pipe.defaults["num_inference_steps"]
        image_to_image = arguments.get("image") is not None
        total = max(1, int(steps * arguments.get("strength", 0.8))) if image_to_image else steps
        if arguments.get("hires_fix"):  # and the refining pass's steps
            total += int((arguments.get("hires_steps") or steps) * arguments.get("hires_strength", 0.7))
        done = [0]  # steps of both passes (the hires pass counts its own from 0)

        def callback(step, timestep, latents):
            done[0] += 1
            if self.progress is not None:
                self.progress.step = min(done[0], total)
            if on_step is not None:
                on_step(min(done[0], total), total)
            return False if session in self.stop_requested else None

        def preview(shown):
            self.previews[session] = shown[0]
            if self.progress is not None:
                self.progress.preview = shown[0]

        with self.lock:
            self.running = session
            self.progress = Progress(session, total)
            self.stop_requested.discard(session)
            original, net, mode = self.pipe.scheduler, self.pipe.controlnet, self.pipe.fast_mode
            try:
                if fast is not None and bool(fast) != (mode is not None):
                    if fast:
                        self.pipe.enable_fast()
                    else:
                        self.pipe.disable_fast()
                if scheduler is not None:
                    self.pipe.set_scheduler(scheduler)
                if "control_image" not in arguments:  # the pipeline's own ControlNet steers control calls only
                    self.pipe.controlnet = None
                result = self.pipe(callback=callback, progress=False, preview=preview,
                                   preview_every=max(1, steps // PREVIEWS), **arguments)
                if (self.pipe.fast_mode is None) != (mode is None):
                    result.recipes()  # hashes these weights now: switching back changes them
            finally:
                if mode is None:
                    self.pipe.disable_fast()
                else:
                    self.pipe.enable_fast(mode.source)
                self.pipe.scheduler, self.pipe.controlnet = original, net
                self.running = None
                self.progress = None
                self.stop_requested.discard(session)
            self.last_steps_run = result.steps_run
            return result

    def switch(self, load):
        """Replace the pipeline by `load()`'s, once the call in progress has ended. Returns the new one."""
        with self.lock:
            self.pipe = load()
            return self.pipe


def stop_on_sigterm() -> None:
    """Make a plain `kill` (SIGTERM) stop a server as Ctrl-C does, so that it shuts down and the process
    removes its temporary folders (`ldm serve`, with or without the API)."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
