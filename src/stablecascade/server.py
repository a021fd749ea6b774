"""HTTP API (FastAPI + uvicorn): a thin shell over one shared pipeline.

One `Worker` thread owns the pipeline and runs jobs one at a time from a bounded queue (torch is not safe for
concurrent generation on one model). Jobs have ids, a status (queued / running / done / failed / cancelled),
cancellation (a queued job is dropped, a running one stops at its next sampling step) and a timeout counted from
submission. The web UI (`webui.py`) submits to the same `Worker`, so both can share one GPU.

Endpoints (every /v1 route checks the API key when one is set; OpenAPI schema at /openapi.json, docs at /docs):

    POST   /v1/txt2img | /v1/img2img | /v1/variation | /v1/controlnet   JSON in, 202 + job (or ?wait=true: the result)
    GET    /v1/jobs                      recent jobs
    GET    /v1/jobs/{id}                 status, progress, parameters, image URLs (?include_images=true: base64)
    DELETE /v1/jobs/{id}                 cancel
    GET    /v1/jobs/{id}/images/{i}.png  result PNG (parameters in its text metadata); control/{i}.png, preview.png
    GET    /v1/loras                     LoRA files the server offers (--lora-dir)
    GET    /health                       liveness, device and queue (no key needed)

Nothing here imports FastAPI or pydantic at import time, so the command line works without the `web` extra.
"""

import argparse
import base64
import binascii
import collections
import functools
import io
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import InputError, StableCascadeError

log = logging.getLogger(__name__)

API_KEY_ENV = "STABLECASCADE_API_KEY"
MODES = ("txt2img", "img2img", "variation", "controlnet")
CONTROL_KINDS = ("canny", "inpaint", "face", "sr")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PROMPT = 4000  # characters; CLIP only reads 77 tokens anyway
WEB_EXTRA_HINT = "install the web extra: pip install 'stablecascade[web]'"


class QueueFull(StableCascadeError):
    """The job queue is full; try again later (HTTP 429)."""


class _Stop(Exception):
    """Raised inside the sampling loop (from the step callback) to stop a cancelled or timed-out job."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ jobs
@dataclass(eq=False)
class Job:
    """One generation request. Written by the worker thread, read by request threads under `changed`."""

    mode: str
    kwargs: dict  # keyword arguments of the pipeline method (images already decoded)
    request: dict  # JSON-able summary of the request (no image data), echoed in the status
    deadline: float  # time.monotonic() after which the job is stopped
    previews: bool = False
    loras: tuple = ()  # ((path, scale), ...)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[dict] = None
    warnings: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    pngs: list = field(default_factory=list)  # their PNG bytes, parameters in the text metadata
    parameters: list = field(default_factory=list)
    control_pngs: list = field(default_factory=list)
    preview: Any = None  # latest Stage C preview (PIL, the batch side by side)
    preview_png: Optional[bytes] = None
    version: int = 0  # bumped on every change (status, progress, preview)
    timeout: float = 0.0
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def done(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def _update(self, **changes):
        with self.changed:
            for k, v in changes.items():
                setattr(self, k, v)
            self.version += 1
            self.changed.notify_all()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job has finished (True) or `timeout` seconds passed (False)."""
        with self.changed:
            return self.changed.wait_for(lambda: self.done, timeout)

    def wait_for_change(self, version: int, timeout: Optional[float] = None) -> int:
        """Block until the job changes after `version` (or finishes, or `timeout`); returns the current version."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != version or self.done, timeout)
            return self.version


def png_bytes(image, parameters: dict) -> bytes:
    """PNG file contents with the parameters as JSON text chunks, like the command line writes them."""
    from PIL import PngImagePlugin

    from .images import PARAMETERS_KEY

    info = PngImagePlugin.PngInfo()
    text = json.dumps(parameters, sort_keys=True, default=str)
    info.add_text(PARAMETERS_KEY, text)
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def side_by_side(images):
    """One PIL image with the given images next to each other (previews of a batch)."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    strip = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    return strip


class Worker:
    """Owns the pipeline; runs queued jobs one after another on a single thread.

    `submit` raises `QueueFull` when `max_queue` jobs are already waiting. Finished jobs are kept (the latest
    `keep_jobs` of them) so their results can be fetched. `extra_parameters` (model names, dtype...) are added to
    every image's parameters."""

    def __init__(self, pipe, *, max_queue: int = 8, keep_jobs: int = 100, default_timeout: float = 600.0,
                 extra_parameters: Optional[dict] = None):
        if max_queue < 1:
            raise InputError("max_queue must be at least 1")
        self.pipe = pipe
        self.max_queue, self.keep_jobs, self.default_timeout = max_queue, keep_jobs, default_timeout
        self.extra_parameters = dict(extra_parameters or {})
        self._queue: collections.deque = collections.deque()
        self._jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._loras: tuple = ()  # what is merged into the pipeline now
        self.running: Optional[Job] = None

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Worker":
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="stablecascade-worker", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread."""
        with self._lock:
            self._stopping = True
            for job in list(self._queue):
                job._update(status="cancelled", finished=time.time())
            self._queue.clear()
            if self.running is not None:
                self.running.cancel_requested.set()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------------------------ jobs
    def capabilities(self) -> dict:
        return {"txt2img": True, "img2img": True, "variation": True,
                "controlnet": callable(getattr(self.pipe, "controlnet", None)),
                "lora": callable(getattr(self.pipe, "load_lora", None))}

    def submit(self, mode: str, kwargs: dict, *, request: Optional[dict] = None, timeout: Optional[float] = None,
               previews: bool = False, loras=()) -> Job:
        """Queue a job: `mode` is one of MODES, `kwargs` the pipeline method's keyword arguments (for
        "controlnet" including `kind` and `control`). `loras`: (path, scale) pairs merged for this job."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; use one of {list(MODES)}")
        if mode == "controlnet" and not self.capabilities()["controlnet"]:
            raise InputError("ControlNet is not available in this version of stablecascade")
        if loras and not self.capabilities()["lora"]:
            raise InputError("LoRA is not available in this version of stablecascade")
        timeout = float(timeout or self.default_timeout)
        job = Job(mode=mode, kwargs=dict(kwargs), request=dict(request or {}), previews=previews,
                  loras=tuple((str(p), float(s)) for p, s in loras), deadline=time.monotonic() + timeout,
                  timeout=timeout)
        if self._thread is None:
            self.start()
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); try again later")
            self._queue.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list:
        with self._lock:
            return list(self._jobs.values())

    def position(self, job: Job) -> Optional[int]:
        """0-based place in the queue of a queued job (None otherwise)."""
        with self._lock:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def cancel(self, job_id: str) -> Optional[Job]:
        """Drop a queued job, or ask a running one to stop at its next step. Finished jobs are left as they are."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                self._queue.remove(job)
                job._update(status="cancelled", finished=time.time())
            elif job.status == "running":
                job.cancel_requested.set()
        return job

    def _forget_old(self):
        finished = [j for j in self._jobs.values() if j.done]
        for job in finished[:max(0, len(finished) - self.keep_jobs)]:
            del self._jobs[job.id]

    # -------------------------------------------------------------------------------------- the thread
    def _loop(self):
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.running = job
            try:
                self._run(job)
                job.kwargs = {}  # drop the decoded input images; the results stay as PNG bytes
            except BaseException:  # never let the thread die with a job left "running"
                log.exception("worker failed on job %s", job.id)
                if not job.done:
                    job._update(status="failed", finished=time.time(),
                                error={"type": "internal", "message": "internal error"})
            finally:
                with self._lock:
                    self.running = None
                    self._forget_old()

    def _check(self, job: Job):
        if job.cancel_requested.is_set():
            raise _Stop("cancelled")
        if time.monotonic() > job.deadline:
            raise _Stop("timeout")

    def _step_callback(self, job: Job):
        """Called by the pipeline after every sampling step: progress, and a cancelled or timed-out job stops."""

        def on_step(event):
            self._check(job)
            job._update(progress={"stage": event.stage, "step": event.step, "total": event.total})

        return on_step

    def _apply_loras(self, wanted: tuple):
        """Make the merged LoRAs exactly `wanted` ((path, scale) pairs); unloading restores the base weights."""
        if wanted == self._loras:
            return
        if self._loras:
            self.pipe.unload_loras()
            self._loras = ()
        try:
            for path, scale in wanted:
                self.pipe.load_lora(path, scale=scale, mode="merge")
        except BaseException:
            self.pipe.unload_loras()  # never leave half of a set merged
            raise
        self._loras = wanted

    def _preview_callback(self, job: Job):
        if not job.previews:
            return None
        try:
            self.pipe.previewer  # loads it on first use; previews are optional, the job is not
        except StableCascadeError as e:
            job.warnings.append(f"live previews are unavailable: {e}")
            return None
        from .images import to_pil

        def on_preview(_step, previews):
            self._check(job)
            image = side_by_side(to_pil(previews))
            job._update(preview=image, preview_png=None)

        return on_preview

    def _run(self, job: Job):
        if time.monotonic() > job.deadline:
            job._update(status="failed", finished=time.time(),
                        error={"type": "timeout", "message": f"timed out after {job.timeout:g} s in the queue"})
            return
        job._update(status="running", started=time.time())
        try:
            if job.loras or self._loras:
                self._apply_loras(job.loras)
            kwargs = dict(job.kwargs, progress=False, step_callback=self._step_callback(job))
            callback = self._preview_callback(job)
            if callback is not None:
                kwargs["preview_callback"] = callback
            control = []
            if job.mode == "txt2img":
                images = self.pipe(**kwargs)
            elif job.mode == "img2img":
                images = self.pipe.img2img(**kwargs)
            elif job.mode == "variation":
                images = self.pipe.variation(**kwargs)
            else:
                images, control = self.pipe.controlnet(**kwargs)
        except _Stop as stop:
            if stop.reason == "cancelled":
                job._update(status="cancelled", finished=time.time())
            else:
                job._update(status="failed", finished=time.time(),
                            error={"type": "timeout", "message": f"timed out after {job.timeout:g} s"})
            return
        except InputError as e:
            job._update(status="failed", finished=time.time(), error={"type": "input", "message": str(e)})
            return
        except StableCascadeError as e:
            job._update(status="failed", finished=time.time(), error={"type": "checkpoint", "message": str(e)})
            return
        except Exception as e:  # a bug or an out-of-memory: report it, keep serving
            log.exception("job %s failed", job.id)
            job._update(status="failed", finished=time.time(),
                        error={"type": "internal", "message": f"{type(e).__name__}: {e}"})
            return
        lora_info = [{"path": Path(p).name, "scale": s} for p, s in job.loras]
        parameters = []
        for image in images:
            p = {**image.info.get("parameters", {}), **self.extra_parameters}
            if lora_info:
                p["loras"] = lora_info
            parameters.append(p)
        pngs = [png_bytes(im, p) for im, p in zip(images, parameters)]
        control_pngs = [png_bytes(im, {"mode": "control", "kind": job.kwargs.get("kind")}) for im in control or []]
        job._update(status="done", finished=time.time(), pngs=pngs, parameters=parameters, control_pngs=control_pngs)


# ------------------------------------------------------------------------------------------ images in JSON
class ImageDataError(InputError):
    """An image in a request cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: str, *, max_pixels: int, name: str = "image"):
    """A PIL image from base64 PNG/JPEG/WebP data (a `data:image/...;base64,` prefix is allowed). Images over
    `max_pixels` are refused (status 413) before their pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise ImageDataError(f"{name}: expected base64-encoded PNG, JPEG or WebP data")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageDataError(f"{name}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError):
        raise ImageDataError(f"{name}: not a PNG, JPEG or WebP image") from None
    if image.format not in IMAGE_FORMATS:
        raise ImageDataError(f"{name}: {image.format} images are not accepted; send PNG, JPEG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDataError(f"{name}: {width}x{height} is {width * height} pixels, more than this server's limit of "
                             f"{max_pixels}; scale it down", status=413)
    try:
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageDataError(f"{name}: cannot decode the image ({e})") from None
    return image


# ------------------------------------------------------------------------------------------ request schemas
@functools.lru_cache(maxsize=None)
def schemas():
    """The pydantic request/response models (built on first use so that pydantic stays an optional import)."""
    from typing import List, Literal, Optional as Opt

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    from .sampling import SAMPLERS
    from .settings import DEFAULTS

    class LoraRef(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(..., min_length=1, max_length=255, description="file name in the server's --lora-dir")
        scale: float = Field(1.0, ge=-4.0, le=4.0)

    class Options(BaseModel):
        """Settings shared by every mode (see `stablecascade generate --help`)."""

        model_config = ConfigDict(extra="forbid")
        negative_prompt: str = Field("", max_length=MAX_PROMPT, description="what to steer away from")
        width: Opt[int] = Field(None, ge=8, le=8192, multiple_of=8,
                                description="output width in pixels, a multiple of 8 (default: the model's native "
                                            "size, 1024 for the released models, or from the input image)")
        height: Opt[int] = Field(None, ge=8, le=8192, multiple_of=8, description="output height, like width")
        num_images_per_prompt: int = Field(DEFAULTS.num_images, ge=1, le=8)
        prior_steps: int = Field(DEFAULTS.prior_steps, ge=1, le=200, description="Stage C sampling steps")
        prior_guidance: float = Field(DEFAULTS.prior_guidance, ge=0, le=50,
                                      description="Stage C classifier-free guidance")
        decoder_steps: int = Field(DEFAULTS.decoder_steps, ge=1, le=200, description="Stage B sampling steps")
        decoder_guidance: Opt[float] = Field(None, ge=0, le=50, description="Stage B guidance; <= 1 switches it "
                                             "off (default: the model's with the GDF samplers, 1.1 for the "
                                             "released models; 0 with 'diffusers')")
        seed: Opt[int] = Field(None, ge=0, le=2**63 - 1, description="random seed (default: random, returned)")
        sampling: Literal[tuple(SAMPLERS)] = Field(DEFAULTS.sampler, description="the sampler")
        compression: float = Field(DEFAULTS.compression, ge=8, le=128, description="image pixels per Stage C latent cell")
        previews: bool = Field(False, description="keep a live Stage C preview at /v1/jobs/{id}/preview.png")
        timeout: Opt[float] = Field(None, gt=0, description="seconds from submission before the job is stopped "
                                                            "(default and maximum set by the server)")
        loras: List[LoraRef] = Field(default_factory=list, max_length=8, description="LoRAs merged for this job")

    class Txt2Img(Options):
        prompt: str = Field(..., max_length=MAX_PROMPT, description="what to draw")

    class Img2Img(Options):
        image: str = Field(..., description="base64 PNG/JPEG/WebP (a data: URL prefix is allowed)")
        prompt: str = Field(..., max_length=MAX_PROMPT)
        strength: float = Field(0.8, ge=0, le=1, description="0 keeps the input, 1 ignores it")

    class Variation(Options):
        images: List[str] = Field(..., min_length=1, max_length=8, description="base64 images, mixed by weight")
        weights: Opt[List[float]] = Field(None, description="one weight per image (default 1 each)")
        prompt: str = Field("", max_length=MAX_PROMPT)

        @model_validator(mode="after")
        def _weights_match(self):
            if self.weights is not None and len(self.weights) != len(self.images):
                raise ValueError(f"got {len(self.weights)} weights for {len(self.images)} images; "
                                 "give one weight per image")
            if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
                raise ValueError("weights must be finite numbers")
            return self

    class ControlNet(Options):
        kind: Literal["canny", "inpaint", "face", "sr"] = Field(..., description="which ControlNet")
        image: str = Field(..., description="the control input, base64 PNG/JPEG/WebP")
        mask: Opt[str] = Field(None, description="inpainting mask (white = redraw), base64")
        prompt: str = Field(..., max_length=MAX_PROMPT)
        control_strength: float = Field(1.0, ge=0, le=2)

    class ImageOut(BaseModel):
        index: int
        url: str
        parameters: dict = Field(default_factory=dict)
        base64: Opt[str] = Field(None, description="PNG data, with ?wait=true or ?include_images=true")

    class JobOut(BaseModel):
        id: str
        mode: str
        status: Literal["queued", "running", "done", "failed", "cancelled"]
        created: float
        started: Opt[float] = None
        finished: Opt[float] = None
        queue_position: Opt[int] = Field(None, description="0 = next to run")
        progress: dict = Field(default_factory=dict, description="current stage (prior/decoder) and step")
        error: Opt[dict] = Field(None, description="{type: input|timeout|checkpoint|internal, message}")
        warnings: List[str] = Field(default_factory=list)
        request: dict = Field(default_factory=dict)
        images: List[ImageOut] = Field(default_factory=list)
        control_images: List[ImageOut] = Field(default_factory=list)
        preview_url: Opt[str] = None

    return {cls.__name__: cls for cls in (LoraRef, Options, Txt2Img, Img2Img, Variation, ControlNet, ImageOut,
                                          JobOut)}


# ------------------------------------------------------------------------------------------ the ASGI app
class _BodyLimit:
    """ASGI middleware answering 413 to request bodies over `limit` bytes: by their Content-Length, or (chunked
    uploads without one) by reading them up to the limit before the application sees them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                return await self._reject(send)
            return await self.app(scope, receive, send)  # the server holds the client to its Content-Length
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._reject(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps({"detail": f"request body over this server's limit of {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _readable(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts)


def create_app(pipe=None, *, worker: Optional[Worker] = None, api_key: Optional[str] = None, max_queue: int = 8,
               max_pixels: int = 2048 * 2048, max_body_bytes: int = 64 * 1024 * 1024,
               default_timeout: float = 600.0, max_timeout: float = 3600.0, keep_jobs: int = 100,
               lora_dir=None, extra_parameters: Optional[dict] = None, title: str = "stablecascade"):
    """The FastAPI application. Give a loaded pipeline (a worker is made, started and stopped with the app) or a
    `Worker` shared with something else (e.g. the web UI; the caller starts and stops it).

    `api_key` (default: $STABLECASCADE_API_KEY) is required on every /v1 route as `Authorization: Bearer KEY` or
    `X-API-Key: KEY`. `max_pixels` bounds input images (413) and outputs (422); `max_body_bytes` the request
    body (413); `max_timeout` the per-job timeout a request may ask for."""
    import contextlib

    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Security
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

    from .pipeline import default_size

    if (pipe is None) == (worker is None):
        raise InputError("create_app needs either a pipeline or a worker")
    own_worker = worker is None
    if own_worker:
        worker = Worker(pipe, max_queue=max_queue, keep_jobs=keep_jobs, default_timeout=default_timeout,
                        extra_parameters=extra_parameters)
    pipe = worker.pipe
    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    lora_root = Path(lora_dir).expanduser().resolve() if lora_dir else None
    S = schemas()
    JobOut, Txt2Img, Img2Img, Variation, ControlNet = (S[n] for n in ("JobOut", "Txt2Img", "Img2Img", "Variation",
                                                                       "ControlNet"))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            if own_worker:
                worker.stop()

    app = FastAPI(title=f"{title} API", version=_version(), lifespan=lifespan,
                  description="Stable Cascade (Würstchen v3) image generation. Jobs run one at a time on one shared "
                              "model; submit, poll /v1/jobs/{id}, fetch PNGs — or add ?wait=true for the result.")
    app.state.worker = worker
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        return JSONResponse(status_code=422, content={"detail": errors, "message": _readable(errors)})

    bearer = HTTPBearer(auto_error=False, description="the server's API key")
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")

    def check_key(credentials: Optional[HTTPAuthorizationCredentials] = Security(bearer),
                  header: Optional[str] = Security(key_header)):
        if api_key is None:
            return
        given = header or (credentials.credentials if credentials else None)
        if given is None or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    # ----------------------------------------------------------------------------------- helpers
    def job_out(job: Job, include_images: bool = False) -> dict:
        base = f"/v1/jobs/{job.id}"
        position = worker.position(job)  # before taking the job's lock (the worker takes them the other way round)
        with job.changed:
            images = [{"index": i, "url": f"{base}/images/{i}.png", "parameters": p,
                       "base64": base64.b64encode(png).decode() if include_images else None}
                      for i, (png, p) in enumerate(zip(job.pngs, job.parameters))]
            control = [{"index": i, "url": f"{base}/control/{i}.png",
                        "base64": base64.b64encode(png).decode() if include_images else None}
                       for i, png in enumerate(job.control_pngs)]
            return dict(id=job.id, mode=job.mode, status=job.status, created=job.created, started=job.started,
                        finished=job.finished, queue_position=position, progress=dict(job.progress),
                        error=job.error, warnings=list(job.warnings), request=job.request, images=images,
                        control_images=control, preview_url=f"{base}/preview.png" if job.preview is not None else None)

    def find(job_id: str) -> Job:
        job = worker.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or finished long ago and forgotten)")
        return job

    def image(data: str, name: str):
        try:
            return decode_image(data, max_pixels=max_pixels, name=name)
        except ImageDataError as e:
            raise HTTPException(e.status, str(e)) from None

    def resolve_loras(refs) -> list:
        if not refs:
            return []
        if not worker.capabilities()["lora"]:
            raise HTTPException(501, "LoRA is not available in this version of stablecascade")
        if lora_root is None:
            raise HTTPException(400, "this server offers no LoRAs (start it with --lora-dir)")
        out = []
        for ref in refs:
            path = (lora_root / ref.name).resolve()
            if path.parent != lora_root or not path.is_file() or path.suffix != ".safetensors":
                raise HTTPException(400, f"unknown LoRA {ref.name!r}; GET /v1/loras lists the available ones")
            out.append((path, ref.scale))
        return out

    def common(body, exclude: set, default_size=None) -> tuple:
        """Pipeline keyword arguments, the JSON summary and the job options of a request. `default_size`: the
        output size when the request gives none (default: the model's native size)."""
        default_size = default_size or (pipe.native_size, pipe.native_size)
        options = body.model_dump(exclude=exclude | {"previews", "timeout", "loras"})
        options = {k: v for k, v in options.items() if not (k in ("width", "height", "seed", "decoder_guidance")
                                                            and v is None)}
        for side in ("width", "height"):
            if side in options and options[side] < pipe.min_size:
                raise HTTPException(422, f"{side}={options[side]} is too small for this model: at least "
                                         f"{pipe.min_size} pixels")
        w, h = options.get("width", default_size[0]), options.get("height", default_size[1])
        if w * h > max_pixels:
            raise HTTPException(422, f"{w}x{h} is more than this server's limit of {max_pixels} pixels per image")
        if body.timeout is not None and body.timeout > max_timeout:
            raise HTTPException(422, f"timeout={body.timeout:g} is over this server's maximum of {max_timeout:g} s")
        summary = body.model_dump(exclude=exclude)
        return options, summary, dict(timeout=body.timeout, previews=body.previews,
                                      loras=resolve_loras(body.loras))

    def submit(mode: str, kwargs: dict, summary: dict, job_options: dict, wait: bool):
        try:
            job = worker.submit(mode, kwargs, request=summary, **job_options)
        except QueueFull as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from None
        except InputError as e:
            raise HTTPException(501, str(e)) from None
        location = {"Location": f"/v1/jobs/{job.id}"}
        if not wait:
            return JSONResponse(status_code=202, content=job_out(job), headers=location)
        finished = job.wait(max(0.0, job.deadline - time.monotonic()) + 60)
        status = 200
        if not finished:
            status = 504
        elif job.status == "cancelled":
            status = 409
        elif job.status == "failed":
            status = {"input": 422, "timeout": 504}.get(job.error["type"], 500)
        return JSONResponse(status_code=status, content=job_out(job, include_images=True), headers=location)

    wait_query = Query(False, description="wait for the job and return its images as base64")
    responses = {202: {"model": JobOut, "description": "queued (poll the Location)"},
                 401: {"description": "API key missing or wrong"}, 413: {"description": "image or body too large"},
                 422: {"description": "invalid request"}, 429: {"description": "queue full"}}

    # ----------------------------------------------------------------------------------- routes
    @v1.post("/txt2img", response_model=JobOut, responses=responses, summary="text-to-image")
    def txt2img(body: Txt2Img, wait: bool = wait_query):
        options, summary, job_options = common(body, set())
        return submit("txt2img", options, summary, job_options, wait)

    @v1.post("/img2img", response_model=JobOut, responses=responses, summary="image-to-image")
    def img2img(body: Img2Img, wait: bool = wait_query):
        picture = image(body.image, "image")
        options, summary, job_options = common(body, {"image"}, default_size(*picture.size))
        options["image"] = picture
        summary["image_size"] = list(picture.size)
        return submit("img2img", options, summary, job_options, wait)

    @v1.post("/variation", response_model=JobOut, responses=responses, summary="image variation")
    def variation(body: Variation, wait: bool = wait_query):
        pictures = [image(data, f"images[{i}]") for i, data in enumerate(body.images)]
        options, summary, job_options = common(body, {"images"})
        options["images"] = pictures
        summary["image_sizes"] = [list(p.size) for p in pictures]
        return submit("variation", options, summary, job_options, wait)

    @v1.post("/controlnet", response_model=JobOut, responses={**responses, 501: {"description": "not available"}},
             summary="ControlNet (canny, inpaint, face, sr)")
    def controlnet(body: ControlNet, wait: bool = wait_query):
        if not worker.capabilities()["controlnet"]:
            raise HTTPException(501, "ControlNet is not available in this version of stablecascade")
        control = image(body.image, "image")
        mask = image(body.mask, "mask") if body.mask is not None else None
        options, summary, job_options = common(body, {"image", "mask"}, default_size(*control.size))
        options.update(control=control, mask=mask)
        summary["image_size"] = list(control.size)
        summary["mask"] = mask is not None
        return submit("controlnet", options, summary, job_options, wait)

    @v1.get("/jobs", summary="recent jobs, newest first")
    def list_jobs() -> list[dict]:
        return [job_out(j) for j in reversed(worker.jobs())]

    @v1.get("/jobs/{job_id}", response_model=JobOut, summary="a job's status and results")
    def get_job(job_id: str, include_images: bool = Query(False, description="embed the PNGs as base64")):
        return job_out(find(job_id), include_images)

    @v1.delete("/jobs/{job_id}", response_model=JobOut, summary="cancel a job")
    def cancel_job(job_id: str):
        find(job_id)
        job = worker.cancel(job_id)
        if job.status == "running":  # answer once it has stopped (next sampling step), briefly
            job.wait(5.0)
        return job_out(job)

    def png_response(data: bytes) -> Response:
        return Response(content=data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @v1.get("/jobs/{job_id}/images/{index}.png", response_class=Response, summary="a result image (PNG)",
            responses={200: {"content": {"image/png": {}}}})
    def get_image(job_id: str, index: int):
        job = find(job_id)
        if not 0 <= index < len(job.pngs):
            raise HTTPException(404, f"job {job_id} has no image {index} (status {job.status}, "
                                     f"{len(job.pngs)} images)")
        return png_response(job.pngs[index])

    @v1.get("/jobs/{job_id}/control/{index}.png", response_class=Response, summary="a ControlNet control image",
            responses={200: {"content": {"image/png": {}}}})
    def get_control(job_id: str, index: int):
        job = find(job_id)
        if not 0 <= index < len(job.control_pngs):
            raise HTTPException(404, f"job {job_id} has no control image {index}")
        return png_response(job.control_pngs[index])

    @v1.get("/jobs/{job_id}/preview.png", response_class=Response, summary="the latest Stage C preview",
            responses={200: {"content": {"image/png": {}}}})
    def get_preview(job_id: str):
        job = find(job_id)
        with job.changed:
            preview = job.preview
            if preview is not None and job.preview_png is None:
                job.preview_png = png_bytes(preview, {"mode": "preview", **job.progress})
            data = job.preview_png
        if data is None:
            raise HTTPException(404, "no preview yet (ask for one with \"previews\": true)")
        return png_response(data)

    @v1.get("/loras", summary="LoRA files offered by this server")
    def list_loras() -> dict:
        files = sorted(p.name for p in lora_root.glob("*.safetensors")) if lora_root and lora_root.is_dir() else []
        return {"available": worker.capabilities()["lora"], "loras": files}

    app.include_router(v1)

    @app.get("/health", summary="liveness, model and queue")
    def health() -> dict:
        running = worker.running
        return {"status": "ok", "version": _version(), "device": str(getattr(pipe, "device", "")),
                "dtype": str(getattr(pipe, "dtype", "")).replace("torch.", ""),
                "queue": {"queued": worker.queued(), "max": worker.max_queue, "running": running is not None},
                "modes": worker.capabilities(), "auth": api_key is not None,
                "limits": {"max_pixels": max_pixels, "max_body_bytes": max_body_bytes,
                           "default_timeout": worker.default_timeout, "max_timeout": max_timeout}}

    return app


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "0"


# ------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `stablecascade serve` (the model options come from the command line's shared group)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (then set an API key) (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require this key on every /v1 request, as 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
                        f"(default: ${API_KEY_ENV}; none: open)")
    g.add_argument("--max-queue", type=int, default=8, help="jobs that may wait; more get HTTP 429 (default 8)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="default per-job timeout in seconds, counted from submission (default 600)")
    g.add_argument("--max-timeout", type=float, default=3600.0,
                   help="longest timeout a request may ask for, in seconds (default 3600)")
    g.add_argument("--max-pixels", type=int, default=2048 * 2048,
                   help="largest input or output image in pixels; bigger inputs get HTTP 413 (default 4194304)")
    g.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MB (default 64)")
    g.add_argument("--keep-jobs", type=int, default=100, help="finished jobs kept for fetching results (default 100)")
    g.add_argument("--lora-dir", metavar="DIR", help="folder of LoRA .safetensors files requests may name")


def require_web_extra(*modules: str) -> None:
    """Fail with a clear message when the optional web dependencies are missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"{', '.join(missing)} not installed: {WEB_EXTRA_HINT}")


def model_parameters(args, pipe) -> dict:
    """Model names and dtype recorded in every image's parameters (as the command line does)."""
    return {"prior": str(getattr(args, "prior", "")), "decoder": str(getattr(args, "decoder", "")),
            "dtype": str(pipe.dtype).replace("torch.", "")}


def serve(pipe, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_options) -> None:
    """Run the HTTP API on a loaded pipeline until interrupted. `app_options`: those of `create_app`."""
    import uvicorn

    keyed = app_options.get("api_key") or os.environ.get(API_KEY_ENV)
    if host not in ("127.0.0.1", "localhost", "::1") and not keyed:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the GPU", host)
    app = create_app(pipe, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def main(args, load: Callable) -> int:
    """`stablecascade serve`: check the web dependencies, load the models with `load(args)`, serve."""
    require_web_extra("fastapi", "uvicorn")
    pipe = load(args)
    print(f"serving the API on http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    serve(pipe, host=args.host, port=args.port, api_key=args.api_key or None, max_queue=args.max_queue,
          default_timeout=args.timeout, max_timeout=args.max_timeout, max_pixels=args.max_pixels,
          max_body_bytes=int(args.max_body_mb * 1024 * 1024), keep_jobs=args.keep_jobs, lora_dir=args.lora_dir,
          extra_parameters=model_parameters(args, pipe))
    return 0
