"""Serving the HTTP API (`ldm serve --api`): the app with or without the page, uvicorn in the foreground, or
on a thread of this process (tests, benchmarks). The routes are in `api`."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI

from .api import build_api
from .api_config import ApiConfig
from .runner import Runner, stop_on_sigterm


def make_app(pipe, config: ApiConfig | None = None, webui: bool = True) -> FastAPI:
    """The API over `pipe`, with the web page mounted at / (webui=True: needs gradio) sharing its runner."""
    if not webui:
        return build_api(Runner(pipe), config)
    import gradio as gr

    from .web import build_app

    demo = build_app(pipe)
    return gr.mount_gradio_app(build_api(demo.ldm_runner, config), demo, path="/")


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, config: ApiConfig | None = None,
          webui: bool = True) -> None:
    """Serve `make_app(pipe, config, webui)` with uvicorn until interrupted (what `ldm serve --api` runs).

    A plain `kill` (SIGTERM) stops it as Ctrl-C does: uvicorn shuts down, then the process ends normally
    and removes the page's temporary folders.
    """
    import uvicorn

    app = make_app(pipe, config, webui)
    stop_on_sigterm()  # uvicorn raises the signal again once it has shut down
    try:
        uvicorn.run(app, host=host, port=port)
    except KeyboardInterrupt:
        pass


def serve_in_thread(app, port: int, host: str = "127.0.0.1", timeout: float = 60.0):
    """Serve `app` with uvicorn on a daemon thread of this process, once it listens (tests, benchmarks).

    Returns the `uvicorn.Server`; set its `should_exit = True` to stop it. Raises a RuntimeError when it
    is not listening within `timeout` seconds.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"serve_in_thread: the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.05)
    return server
