"""AUTOMATIC1111's HTTP API (`ldm serve --api`): /sdapi/v1/txt2img, img2img, png-info, options, ...

A FastAPI app whose routes take A1111's request bodies (`api_models`) and answer as A1111 does:
`{images: [base64 PNG], parameters: the request, info: JSON string}`; each PNG carries A1111's
`parameters` text and our recipe. OpenAPI docs are at /docs. The page (`web`) mounts on the same app
and shares the `Runner`, so that one pipeline call runs at a time, whoever asked for it.

Safe by default: HTTP Basic credentials when configured (compared in constant time); limits on
size, steps, images, ControlNet units, pictures and body bytes answered with a 4xx before any work;
models, LoRAs and ControlNets named only from the configured folders (`api_config`); a malformed
request gets a 422 (its shape) or a 400 (its values, with the pipeline's message), never a 500.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import __version__
from . import api_calls
from .api_config import ApiConfig, Entry, load_embeddings
from .api_models import (EmbeddingsResponse, ImageResponse, Img2ImgRequest, LoraItem, PngInfoRequest,
                         PngInfoResponse, ProgressResponse, ProgressState, SamplerItem, SchedulerItem, SDModelItem,
                         Txt2ImgRequest)
from .runner import Runner

PREFIXES = ("/sdapi/", "/controlnet/")  # the API's paths: the body limit and credentials apply here
CONTROLNETS_KEPT = 2  # ControlNets kept loaded between requests


@dataclass
class _Job:
    """An API request being served: its batches, and whether it was asked to stop."""

    session: str
    count: int
    model: str = ""  # the model it draws with
    number: int = 0
    interrupted: bool = False
    skipped: bool = False
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))


class _BodyLimit:
    """ASGI middleware: API requests whose body passes `limit` bytes get a 413, declared or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PREFIXES):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse({"detail": f"the request body is more than the server's limit of {self.limit} "
                                               "bytes"}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"the request body is more than the server's limit of {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


class Api:
    """The API's state: the shared runner, the configuration, the request being served."""

    def __init__(self, runner: Runner, config: ApiConfig):
        self.runner, self.config = runner, config
        self.model = config.model_name  # the name of the model the runner's pipeline holds
        self.job: _Job | None = None
        self.waiting = 0
        self.waiting_lock = threading.Lock()
        self.nets: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.embeddings = load_embeddings(runner.pipe, config.embeddings_dir, config.allow_pickle)

    # -- models -----------------------------------------------------------------------------

    def _loader(self, name: str):
        """How to load the model a client names (the starting one, or one of the checkpoint folder)."""
        if name == self.config.model_name and self.config.load_model is not None:
            return self.config.load_model
        entry = self.config.find("checkpoint", "sd_model_checkpoint", name)
        return lambda: self.config.load_checkpoint(entry)

    def use_model(self, name: str) -> str:
        """Load the named model into the runner (after the call in progress). Returns the previous name."""
        previous = self.model
        if name != self.model:
            load = self._loader(name)
            pipe = self.runner.switch(load)
            self.embeddings = load_embeddings(pipe, self.config.embeddings_dir, self.config.allow_pickle)
            self.model = name
        return previous

    def controlnet(self, entry: Entry, pipe):
        from ..loading.controlnet import load_controlnet

        net = self.nets.pop(entry.name, None)
        if net is None:
            net = load_controlnet(entry.path, torch_dtype=pipe.dtype)
        self.nets[entry.name] = net
        while len(self.nets) > CONTROLNETS_KEPT:
            self.nets.popitem(last=False)
        return net.to(pipe.device, pipe.dtype)

    # -- drawing ----------------------------------------------------------------------------

    def generate(self, request: Txt2ImgRequest, img2img: bool) -> ImageResponse:
        plan = api_calls.plan(request, self.config, img2img, int(self.runner.pipe.defaults["num_inference_steps"]))
        with self.waiting_lock:
            if self.waiting >= self.config.limits.queue:
                raise HTTPException(503, f"{self.waiting} requests are waiting; try again later")
            self.waiting += 1
        job = _Job(f"api-{uuid.uuid4().hex}", plan.batches)
        try:
            with self.runner.lock:
                self.job = job
                try:
                    results = self._draw(plan, job, request)
                finally:
                    self.job = None
        finally:
            with self.waiting_lock:
                self.waiting -= 1
        # once per batch: each recipes() looks the model hash up (3 looks: ~6 % of a 64x64 request, cProfile)
        recipes = [result.recipes() for result in results]
        images = [api_calls.png_base64(image, recipe) for result, drawn in zip(results, recipes)
                  for image, recipe in zip(result.images, drawn)] if request.send_images else []
        parameters = request.model_dump()
        if img2img and not request.include_init_images:
            parameters.update(init_images=None, mask=None)
        return ImageResponse(images=images, parameters=parameters,
                             info=api_calls.info(request, results, recipes, job.model))

    def _draw(self, plan: api_calls.Plan, job: _Job, request) -> list:
        previous = self.use_model(plan.model) if plan.model is not None else None
        try:
            pipe, job.model = self.runner.pipe, self.model
            arguments = dict(plan.arguments)
            if plan.controlnets:
                arguments["controlnet"] = [self.controlnet(entry, pipe) for entry in plan.controlnets]
            if plan.loras and pipe.loras:
                raise ValueError("prompt: <lora:...> tags need a model without LoRAs loaded beforehand")
            try:
                for (entry, weight), name in zip(plan.loras, api_calls.adapter_names(plan.loras)):
                    pipe.load_lora_weights(entry.path, adapter_name=name, scale=weight,
                                           allow_pickle=self.config.allow_pickle)
                results = []
                for number in range(plan.batches):
                    if job.interrupted:
                        break
                    job.number, job.skipped = number, False
                    seed = plan.seed + number * request.batch_size  # image i of the request: seed + i
                    results.append(self.runner.draw(job.session, plan.scheduler, seed=seed, **arguments))
                    self.runner.previews.pop(job.session, None)  # the page's; this session has no page
                return results
            finally:
                if plan.loras and pipe.loras:
                    pipe.unload_lora_weights()
        finally:
            if previous is not None and request.override_settings_restore_afterwards:
                self.use_model(previous)

    # -- watching ---------------------------------------------------------------------------

    def progress(self, skip_current_image: bool) -> ProgressResponse:
        job, running = self.job, self.runner.progress
        if running is None and job is None:
            return ProgressResponse(progress=0, eta_relative=0, state=ProgressState(), current_image=None)
        count, number = (job.count, job.number) if job is not None else (1, 0)
        share = running.step / running.total if running is not None else 0.0
        done = (number + share) / max(1, count)
        elapsed = time.monotonic() - (job.started if job is not None else running.started)
        state = ProgressState(skipped=bool(job and job.skipped), interrupted=bool(job and job.interrupted),
                              job=(job.session if job else running.session) or "", job_count=count,
                              job_timestamp=job.timestamp if job else "0", job_no=number,
                              sampling_step=running.step if running else 0,
                              sampling_steps=running.total if running else 0)
        preview = running.preview if running is not None and not skip_current_image else None
        return ProgressResponse(progress=round(done, 4), eta_relative=elapsed / done - elapsed if done > 0 else 0,
                                state=state, current_image=api_calls.picture_base64(preview) if preview else None)

    def stop(self, skip: bool) -> dict:
        job = self.job
        if job is not None:
            if skip:
                job.skipped = True
            else:
                job.interrupted = True
            self.runner.stop(job.session)
        return {}

    # -- lists and options --------------------------------------------------------------------

    def options(self) -> dict:
        return {"sd_model_checkpoint": self.model, "sd_checkpoint_hash": None, "samples_format": "png"}

    def set_options(self, changes: dict) -> None:
        current = self.options()
        for key, value in changes.items():
            if key != "sd_model_checkpoint" and current.get(key, object()) != value:
                raise ValueError(f"options: {key!r} cannot be set here; sd_model_checkpoint can")
        if "sd_model_checkpoint" in changes:
            name = api_calls.check_name("sd_model_checkpoint", changes["sd_model_checkpoint"])
            self._loader(name)  # an unknown name fails now, before the queue
            with self.runner.lock:
                self.use_model(name)

    def sd_models(self) -> list[SDModelItem]:
        names = ([self.config.model_name] if self.config.load_model is not None or self.model == self.config.model_name
                 else []) + [name for name in self.config.entries("checkpoint") if name != self.config.model_name]
        return [SDModelItem(title=name, model_name=re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name),
                            filename=name) for name in names]


def build_api(runner: Runner, config: ApiConfig | None = None, app: FastAPI | None = None) -> FastAPI:
    """A FastAPI app serving A1111's API over `runner` (the page's, to share the queue, or `Runner(pipe)`).

    Args:
        config: limits, credentials and folders (default: `ApiConfig()`: no credentials, no folders).
        app: add the routes to this app instead of a new one.
    """
    config = config or ApiConfig()
    if config.model_name is None:
        config = dataclasses.replace(config, model_name=runner.pipe.identity.name or "model")
    api = Api(runner, config)
    app = app or FastAPI(title="ldm-pipeline API", version=__version__,
                         description="AUTOMATIC1111's HTTP API over an ldm-pipeline model.")
    app.state.ldm_api = api
    app.add_middleware(_BodyLimit, limit=config.limits.body_bytes)
    basic = HTTPBasic(auto_error=False)

    def credentials(given: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not config.auth:
            return
        known = False
        for user, password in config.auth:  # every pair compared, each in constant time
            same_user = secrets.compare_digest((given.username if given else "").encode(), user.encode())
            same_password = secrets.compare_digest((given.password if given else "").encode(), password.encode())
            known |= same_user & same_password
        if not (given and known):
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    guarded = dict(dependencies=[Depends(credentials)]) if config.auth else {}

    def answer(work):
        """The pipeline's ValueError and TypeError are the request's fault: 400 with their message."""
        try:
            return work()
        except (ValueError, TypeError) as error:
            raise HTTPException(400, str(error)) from None

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse, tags=["sdapi"], **guarded)
    def txt2img(request: Txt2ImgRequest) -> ImageResponse:
        """Text to image; `alwayson_scripts.controlnet` units steer it; `<lora:NAME:W>` in the prompt loads a LoRA."""
        return answer(lambda: api.generate(request, img2img=False))

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse, tags=["sdapi"], **guarded)
    def img2img(request: Img2ImgRequest) -> ImageResponse:
        """Image to image from `init_images[0]`; with `mask`, inpainting (white is repainted)."""
        return answer(lambda: api.generate(request, img2img=True))

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse, tags=["sdapi"], **guarded)
    def png_info(request: PngInfoRequest) -> PngInfoResponse:
        """The text chunks of a PNG: A1111's `parameters` (read into keys) and the rest, our recipe among them."""
        def read():
            picture = api_calls.decode_picture(request.image, "image", config.limits.picture_pixels, mode=None)
            items = {k: v for k, v in picture.info.items() if isinstance(v, (str, int, float))}
            text = items.pop("parameters", "")
            return PngInfoResponse(info=text, items=items,
                                   parameters=api_calls.png_parameters(text) if text else {})
        return answer(read)

    @app.get("/sdapi/v1/options", tags=["sdapi"], **guarded)
    async def get_options() -> dict[str, Any]:
        return api.options()

    @app.post("/sdapi/v1/options", tags=["sdapi"], **guarded)
    def set_options(changes: dict[str, Any] = Body(...)) -> None:
        """`sd_model_checkpoint`: load that model (a title of /sd-models) once the call in progress has ended."""
        answer(lambda: api.set_options(changes))

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["sdapi"], **guarded)
    def sd_models():
        return api.sd_models()

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"], **guarded)
    async def refresh_checkpoints() -> dict:
        return {}  # the folders are read at each request

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["sdapi"], **guarded)
    async def samplers():
        return [SamplerItem(name=theirs, aliases=[ours], options={})
                for theirs, ours in api_calls.SAMPLER_NAMES.items()]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], tags=["sdapi"], **guarded)
    async def schedulers():
        return [SchedulerItem(name=name, label=label) for name, label in api_calls.SCHEDULE_TYPES.items()]

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem], tags=["sdapi"], **guarded)
    def loras():
        return [LoraItem(name=name, alias=name, path=name) for name in config.entries("lora")]

    @app.post("/sdapi/v1/refresh-loras", tags=["sdapi"], **guarded)
    async def refresh_loras() -> dict:
        return {}

    @app.get("/sdapi/v1/embeddings", response_model=EmbeddingsResponse, tags=["sdapi"], **guarded)
    async def embeddings():
        loaded, skipped = api.embeddings
        return EmbeddingsResponse(loaded=loaded, skipped=skipped)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"], **guarded)
    async def interrupt() -> dict:
        """Stop the request being served after its current step; it answers with what it has drawn."""
        return api.stop(skip=False)

    @app.post("/sdapi/v1/skip", tags=["sdapi"], **guarded)
    async def skip() -> dict:
        """Stop the current batch of the request being served after its current step; the next batches run."""
        return api.stop(skip=True)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["sdapi"], **guarded)
    async def progress(skip_current_image: bool = Query(False)):
        """How far the call in progress is, with its live preview as `current_image` (base64 PNG)."""
        return api.progress(skip_current_image)

    @app.get("/controlnet/model_list", tags=["controlnet"], **guarded)
    def controlnet_models() -> dict[str, list[str]]:
        return {"model_list": sorted(config.entries("controlnet"))}

    @app.get("/controlnet/module_list", tags=["controlnet"], **guarded)
    async def controlnet_modules() -> dict[str, list[str]]:
        return {"module_list": list(api_calls.CONTROL_MODULES)}

    return app
