"""HTTP API (FastAPI + uvicorn): a thin shell over the job queue (`jobs.Worker`) that the web UI shares.

Endpoints (every /v1 route checks the API key when one is set; OpenAPI schema at /openapi.json, docs at /docs):

    POST   /v1/txt2img | /v1/img2img | /v1/variation | /v1/controlnet   JSON in, 202 + job (or ?wait=true: the result)
    GET    /v1/jobs                      recent jobs
    GET    /v1/jobs/{id}                 status, progress, parameters, image URLs (?include_images=true: base64);
                                         a finished job is kept `keep_seconds` (default 600) after it ends
    DELETE /v1/jobs/{id}                 cancel
    GET    /v1/jobs/{id}/events          Server-Sent Events: progress (percent, ETA) and preview frames
    GET    /v1/jobs/{id}/images/{i}.png  result PNG (parameters in its text metadata); control/{i}.png, preview.png
    POST   /sdapi/v1/...                 the AUTOMATIC1111-compatible API (`sdapi.py`)
    GET    /v1/loras                     LoRA files the server offers (--lora-dir)
    GET    /health                       liveness, device and queue (no key needed)

Nothing here imports FastAPI or pydantic at import time, so the command line works without the `web` extra.
"""

import argparse
import asyncio
import base64
import binascii
import difflib
import functools
import io
import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from . import controlnets
from .errors import InputError, UnsupportedError
from .images import png_bytes
from .jobs import Job, QueueFull, Worker

log = logging.getLogger(__name__)

API_KEY_ENV = "STABLECASCADE_API_KEY"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PROMPT = 4000  # characters; CLIP only reads 77 tokens anyway
WAIT_POLL_SECONDS = 0.05  # how often a ?wait=true request looks at its job
WEB_EXTRA_HINT = "install the web extra: pip install 'stablecascade[web]'"
FIELD_ALIASES = {  # diffusers' and AUTOMATIC1111's names -> ours
    "steps": "prior_steps", "num_inference_steps": "prior_steps", "prior_num_inference_steps": "prior_steps",
    "guidance_scale": "prior_guidance", "prior_guidance_scale": "prior_guidance", "cfg_scale": "prior_guidance",
    "decoder_num_inference_steps": "decoder_steps", "decoder_guidance_scale": "decoder_guidance",
    "num_images": "num_images_per_prompt", "batch_size": "num_images_per_prompt", "sampler": "sampling",
    "sampler_name": "sampling", "denoising_strength": "strength",
}
KEYED_PATHS = ("/v1/", "/sdapi/")  # what the API key guards
FAILURE_STATUS = {"input": 422, "timeout": 504, "unsupported": 501}  # HTTP status of a failed job, by error type
KEY_HINT = ("missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (or, from an "
            "AUTOMATIC1111 client, any user name with the key as password)")


# ------------------------------------------------------------------------------------------ images in JSON
class ImageDataError(InputError):
    """An image in a request cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: str, *, max_pixels: int, name: str = "image"):
    """A PIL image from base64 PNG/JPEG/WebP data (a `data:image/...;base64,` prefix is allowed). Images over
    `max_pixels` are refused (status 413) before their pixels are decoded; so are oversized text chunks (400)."""
    from .errors import LimitError
    from .images import open_image

    if not isinstance(data, str) or not data:
        raise ImageDataError(f"{name}: expected base64-encoded PNG, JPEG or WebP data")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageDataError(f"{name}: not valid base64") from None
    try:
        return open_image(io.BytesIO(raw), max_pixels=max_pixels, name=name, formats=IMAGE_FORMATS,
                          limit_option="the server's --max-pixels")
    except LimitError as e:
        raise ImageDataError(str(e), status=413) from None
    except InputError as e:
        raise ImageDataError(str(e)) from None


# ------------------------------------------------------------------------------------------ request schemas
def check_json_values(value, where: str = "body") -> None:
    """Refuse what Python's JSON parser lets through but no request may hold: NaN, Infinity and numbers too large
    for a float (1e400 parses as infinity), and strings with lone surrogates (they cannot be encoded back)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: NaN, Infinity and numbers beyond 1.8e308 are not accepted; send a finite number")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: the text holds a lone surrogate (\\ud800-\\udfff escape); send valid "
                             "Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_values(key, where)
            check_json_values(item, f"{where}.{_clip(str(key))}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_values(item, f"{where}[{i}]")


def _clip(text: str, limit: int = 64) -> str:
    """`text` made safe to send back: at most `limit` characters, lone surrogates escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def canonical_fields(data, known: set):
    """A request body with the other tools' names of our settings renamed (`FIELD_ALIASES`), seed -1 dropped (random)
    and unknown fields refused with the closest known name."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for alias, name in FIELD_ALIASES.items():
        if alias in data and name in known:
            if name in data:
                raise ValueError(f"give {name!r} or its alias {alias!r}, not both")
            data[name] = data.pop(alias)
    if data.get("seed") == -1:
        del data["seed"]
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, *FIELD_ALIASES], n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(known))}"
            raise ValueError(f"unknown field {_clip(name)!r}{hint}")
    return data


@functools.lru_cache(maxsize=None)
def schemas():
    """The pydantic request/response models (built on first use so that pydantic stays an optional import)."""
    from typing import List, Literal, Optional as Opt

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    from .sampling import SAMPLERS
    from .settings import DEFAULTS

    class Request(BaseModel):
        """A request body: every value finite and valid Unicode (checked on the raw JSON, before the fields);
        diffusers' and AUTOMATIC1111's names of the settings are accepted (`FIELD_ALIASES`), seed -1 means random,
        and an unknown field is refused naming the closest known one."""

        model_config = ConfigDict(extra="forbid")

        @model_validator(mode="before")
        @classmethod
        def _finite_and_unicode(cls, data):
            check_json_values(data)
            return canonical_fields(data, set(cls.model_fields))

    class LoraRef(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(..., min_length=1, max_length=255, description="file name in the server's --lora-dir")
        scale: float = Field(1.0, ge=-4.0, le=4.0)

    class Options(Request):
        """Settings shared by every mode (see `stablecascade generate --help`)."""

        prompt: str = Field("", max_length=MAX_PROMPT, description="what to draw")
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
        seed: Opt[int] = Field(None, ge=0, le=2**63 - 1, description="random seed; image i of the request gets "
                               "seed + i (default, or -1: random; returned)")
        sampling: Literal[tuple(SAMPLERS)] = Field(DEFAULTS.sampler, description="the sampler (GET /sdapi/v1/samplers "
                                                   "lists their AUTOMATIC1111 names)")
        compression: Opt[float] = Field(None, ge=8, le=128, description="image pixels per Stage C latent cell "
                                        "(default the model's: 42.67 for the released models)")
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
            return self

    class ControlNet(Options):
        kind: Literal[tuple(controlnets.KINDS)] = Field(..., description=controlnets.summary())
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
        error: Opt[dict] = Field(None, description="{type: input|unsupported|timeout|checkpoint|internal, message}")
        warnings: List[str] = Field(default_factory=list)
        request: dict = Field(default_factory=dict)
        images: List[ImageOut] = Field(default_factory=list)
        control_images: List[ImageOut] = Field(default_factory=list)
        preview_url: Opt[str] = None

    return {cls.__name__: cls for cls in (LoraRef, Options, Txt2Img, Img2Img, Variation, ControlNet, ImageOut,
                                          JobOut)}


# ------------------------------------------------------------------------------------------ the ASGI app
class _Gate:
    """ASGI middleware run before any request body is read: answers 401 to a /v1 request without the API key
    (`authorized(headers)` says), then 413 to a body over `limit` bytes, by its Content-Length or (chunked uploads
    without one) by reading it up to the limit before the application sees it."""

    def __init__(self, app, limit: int, authorized: Callable[[dict], bool]):
        self.app, self.limit, self.authorized = app, limit, authorized

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope.get("path", "").startswith(KEYED_PATHS) and not self.authorized(headers):
            return await _send_json(send, 401, {"detail": KEY_HINT}, [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length")
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
        await _send_json(send, 413, {"detail": f"request body over this server's limit of {self.limit} bytes"})


async def _send_json(send, status: int, content: dict, headers: tuple = ()) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _safe_errors(errors, limit: int = 20) -> list:
    """Pydantic's validation errors without the offending input (it may be megabytes, or not encodable as JSON:
    NaN, lone surrogates), keys and messages clipped, at most `limit` of them."""
    return [{"loc": [x if isinstance(x, int) else _clip(str(x)) for x in e.get("loc", ())],
             "msg": _clip(str(e.get("msg", "")), 300), "type": str(e.get("type", ""))} for e in errors[:limit]]


def _readable(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


def create_app(pipe=None, *, worker: Optional[Worker] = None, api_key: Optional[str] = None, max_queue: int = 8,
               max_pixels: int = 2048 * 2048, max_body_bytes: int = 64 * 1024 * 1024,
               default_timeout: float = 600.0, max_timeout: float = 3600.0, keep_seconds: float = 600.0,
               max_kept_bytes: int = 1024 * 1024 * 1024, lora_dir=None, extra_parameters: Optional[dict] = None, title: str = "stablecascade"):
    """The FastAPI application. Give a loaded pipeline (a worker is made, started and stopped with the app) or a
    `Worker` shared with something else (e.g. the web UI; the caller starts and stops it).

    `api_key` (default: $STABLECASCADE_API_KEY) is required on every /v1 route as `Authorization: Bearer KEY` or
    `X-API-Key: KEY`, checked before the body is read. `max_pixels` bounds input images (413) and outputs (422);
    `max_body_bytes` the request body (413); `max_timeout` the per-job timeout a request may ask for; finished
    jobs are kept `keep_seconds`, within `max_kept_bytes` (see `Worker`)."""
    import contextlib

    from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Security
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import APIKeyHeader, HTTPBearer
    from fastapi_offline import FastAPIOffline
    from starlette.concurrency import run_in_threadpool

    from .geometry import default_size

    if (pipe is None) == (worker is None):
        raise InputError("create_app needs either a pipeline or a worker")
    own_worker = worker is None
    if own_worker:
        worker = Worker(pipe, max_queue=max_queue, keep_seconds=keep_seconds, max_kept_bytes=max_kept_bytes,
                        default_timeout=default_timeout, extra_parameters=extra_parameters)
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

    app = FastAPIOffline(title=f"{title} API", version=_version(), lifespan=lifespan,
                  description="Stable Cascade (Würstchen v3) image generation. Jobs run one at a time on one shared "
                              "model; submit, poll /v1/jobs/{id}, fetch PNGs — or add ?wait=true for the result.")
    app.state.worker = worker

    def authorized(headers: dict) -> bool:
        if api_key is None:
            return True
        given = headers.get(b"x-api-key")
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if given is None and scheme.lower() == b"bearer":
            given = token.strip()
        elif given is None and scheme.lower() == b"basic":  # AUTOMATIC1111 clients: the key is the password
            try:
                given = base64.b64decode(token.strip(), validate=True).partition(b":")[2]
            except binascii.Error:
                return False
        return given is not None and secrets.compare_digest(given, api_key.encode())

    app.add_middleware(_Gate, limit=max_body_bytes, authorized=authorized)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = _safe_errors(exc.errors())
        return JSONResponse(status_code=422, content={"detail": errors, "message": _readable(errors)})

    bearer = HTTPBearer(auto_error=False, description="the server's API key")
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")

    def key_schemes(_bearer=Security(bearer), _header=Security(key_header)):
        """Declares the two ways to send the key in the OpenAPI schema; `_Gate` checks it, before the body."""

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(key_schemes)])

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
            raise HTTPException(404, f"no job {_clip(job_id)!r} (unknown, or finished more than "
                                     f"{worker.keep_seconds:g} s ago and forgotten)")
        return job

    def image(data: str, name: str):
        try:
            return decode_image(data, max_pixels=max_pixels, name=name)
        except ImageDataError as e:
            raise HTTPException(e.status, str(e)) from None

    def resolve_loras(refs) -> list:
        if not refs:
            return []
        if not worker.loras_supported:
            raise HTTPException(501, "this pipeline cannot load LoRAs")
        if lora_root is None:
            raise HTTPException(400, "this server offers no LoRAs (start it with --lora-dir)")
        out = []
        for ref in refs:
            path = (lora_root / ref.name).resolve()
            if path.parent != lora_root or not path.is_file() or path.suffix != ".safetensors":
                raise HTTPException(400, f"unknown LoRA {ref.name!r}; GET /v1/loras lists the available ones")
            out.append((path, ref.scale))
        return out

    def check_size(w: int, h: int) -> None:
        if w * h > max_pixels:
            raise HTTPException(422, f"{w}x{h} is more than this server's limit of {max_pixels} pixels per image")

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
        check_size(options.get("width", default_size[0]), options.get("height", default_size[1]))
        if body.timeout is not None and body.timeout > max_timeout:
            raise HTTPException(422, f"timeout={body.timeout:g} is over this server's maximum of {max_timeout:g} s")
        summary = body.model_dump(exclude=exclude)
        return options, summary, dict(timeout=body.timeout, previews=body.previews,
                                      loras=resolve_loras(body.loras))

    async def finished(job: Job, timeout: float) -> bool:
        """Wait for the job on the event loop, holding no thread: many waiting requests must not use up the
        thread pool that serves every other request."""
        deadline = time.monotonic() + timeout
        while not job.done and time.monotonic() < deadline:
            await asyncio.sleep(WAIT_POLL_SECONDS)
        return job.done

    def enqueue(mode: str, kwargs: dict, summary: dict, **job_options) -> Job:
        """Queue a job; the worker's refusals become 429 (queue full), 501 (not for this model) or 422."""
        try:
            return worker.submit(mode, kwargs, request=summary, **job_options)
        except QueueFull as e:
            raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except UnsupportedError as e:
            raise HTTPException(501, str(e)) from None
        except InputError as e:
            raise HTTPException(422, str(e)) from None

    async def submit(mode: str, prepare: Callable[[], tuple], wait: bool):
        """Run `prepare()` (decoding images: in a thread) for the pipeline arguments, the request summary and the
        job options; queue the job; answer 202, or with ?wait=true the finished job."""
        kwargs, summary, job_options = await run_in_threadpool(prepare)
        job = enqueue(mode, kwargs, summary, **job_options)
        location = {"Location": f"/v1/jobs/{job.id}"}
        if not wait:
            return JSONResponse(status_code=202, content=job_out(job), headers=location)
        status = 200
        if not await finished(job, max(0.0, job.deadline - time.monotonic()) + 60):
            status = 504
        elif job.status == "cancelled":
            status = 409
        elif job.status == "failed":
            status = FAILURE_STATUS.get(job.error["type"], 500)
        content = await run_in_threadpool(job_out, job, True)
        return JSONResponse(status_code=status, content=content, headers=location)

    caps = worker.capabilities()
    tiny_png = base64.b64encode(png_bytes(_blank(caps.native_size), {})).decode()

    def examples(mode: str) -> dict:
        """Request examples for /docs that fit the loaded model (its prompts, its native size)."""
        body = {"prompt": caps.examples[0], "width": caps.native_size, "height": caps.native_size, "seed": 1}
        body.update({"img2img": {"image": tiny_png, "strength": 0.6}, "variation": {"images": [tiny_png], "prompt": ""},
                     "controlnet": {"kind": next((k for k, r in caps.controlnets.items() if r is None), "canny"),
                                    "image": tiny_png}}.get(mode, {}))
        note = caps.reason(mode)
        return {"example": {"summary": f"{mode} with this model" + (f" (not available: {note})" if note else ""),
                            "value": body}}

    wait_query = Query(False, description="wait for the job and return its images as base64")
    responses = {202: {"model": JobOut, "description": "queued (poll the Location)"},
                 401: {"description": "API key missing or wrong"}, 413: {"description": "image or body too large"},
                 422: {"description": "invalid request"}, 429: {"description": "queue full"}}

    # ----------------------------------------------------------------------------------- routes
    @v1.post("/txt2img", response_model=JobOut, responses=responses, summary="text-to-image")
    async def txt2img(body: Txt2Img = Body(openapi_examples=examples("txt2img")), wait: bool = wait_query):
        return await submit("txt2img", lambda: common(body, set()), wait)

    @v1.post("/img2img", response_model=JobOut, responses=responses, summary="image-to-image")
    async def img2img(body: Img2Img = Body(openapi_examples=examples("img2img")), wait: bool = wait_query):
        def prepare():
            picture = image(body.image, "image")
            options, summary, job_options = common(body, {"image"}, default_size(*picture.size))
            options["image"] = picture
            summary["image_size"] = list(picture.size)
            return options, summary, job_options

        return await submit("img2img", prepare, wait)

    @v1.post("/variation", response_model=JobOut, responses=responses, summary="image variation")
    async def variation(body: Variation = Body(openapi_examples=examples("variation")),
                        wait: bool = wait_query):
        def prepare():
            pictures = [image(data, f"images[{i}]") for i, data in enumerate(body.images)]
            options, summary, job_options = common(body, {"images"})
            options["images"] = pictures
            summary["image_sizes"] = [list(p.size) for p in pictures]
            return options, summary, job_options

        return await submit("variation", prepare, wait)

    @v1.post("/controlnet", response_model=JobOut, responses={**responses, 501: {"description": "not available"}},
             summary=f"ControlNet ({', '.join(controlnets.KINDS)})")
    async def controlnet(body: ControlNet = Body(openapi_examples=examples("controlnet")),
                         wait: bool = wait_query):
        def prepare():
            control = image(body.image, "image")
            mask = image(body.mask, "mask") if body.mask is not None else None
            options, summary, job_options = common(body, {"image", "mask"}, default_size(*control.size))
            options.update(control=control, mask=mask)
            summary["image_size"] = list(control.size)
            summary["mask"] = mask is not None
            return options, summary, job_options

        return await submit("controlnet", prepare, wait)

    @v1.get("/jobs", summary="recent jobs, newest first")
    def list_jobs() -> list[dict]:
        return [job_out(j) for j in reversed(worker.jobs())]

    @v1.get("/jobs/{job_id}", response_model=JobOut, summary="a job's status and results")
    def get_job(job_id: str, include_images: bool = Query(False, description="embed the PNGs as base64")):
        return job_out(find(job_id), include_images)

    @v1.delete("/jobs/{job_id}", response_model=JobOut, summary="cancel a job")
    async def cancel_job(job_id: str):
        find(job_id)
        job = worker.cancel(job_id)
        if job.status == "running":  # answer once it has stopped (next sampling step), briefly
            await finished(job, 5.0)
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

    @v1.get("/jobs/{job_id}/events", summary="Server-Sent Events: progress and preview frames until the job ends",
            response_class=Response, responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str):
        """`progress` events (status, stage, step, total, percent, ETA, queue position) whenever the job changes,
        `preview` events (the Previewer's picture as base64 PNG) when a new one is made, then one `done`, `failed`
        or `cancelled` event carrying the job as GET /v1/jobs/{id} returns it."""
        from sse_starlette.sse import EventSourceResponse

        job = find(job_id)

        async def stream():
            version, preview = -1, None
            while True:
                if job.version != version or job.done:
                    version = job.version
                    yield {"event": "progress", "data": json.dumps({"status": job.status,
                                                                    "queue_position": worker.position(job),
                                                                    **job.progress})}
                    if job.preview is not None and job.preview is not preview:
                        preview = job.preview
                        data = await run_in_threadpool(png_bytes, preview, {"mode": "preview", **job.progress})
                        yield {"event": "preview", "data": base64.b64encode(data).decode()}
                    if job.done:
                        yield {"event": job.status, "data": json.dumps(await run_in_threadpool(job_out, job))}
                        return
                await asyncio.sleep(WAIT_POLL_SECONDS)

        return EventSourceResponse(stream(), ping=15)

    @v1.get("/loras", summary="LoRA files offered by this server")
    def list_loras() -> dict:
        files = sorted(p.name for p in lora_root.glob("*.safetensors")) if lora_root and lora_root.is_dir() else []
        return {"available": worker.loras_supported, "loras": files}

    app.include_router(v1)
    from .sdapi import build_router

    app.include_router(build_router(worker, dependencies=[Depends(key_schemes)], decode=image, check_size=check_size,
                                    enqueue=enqueue, finished=finished,
                                    model_name=str((extra_parameters or {}).get("prior") or title)))

    @app.get("/health", summary="liveness, model and queue")
    async def health() -> dict:  # on the event loop: answers even when every pool thread is busy
        running = worker.running
        return {"status": "ok", "version": _version(), "device": str(getattr(pipe, "device", "")),
                "dtype": str(getattr(pipe, "dtype", "")).replace("torch.", ""),
                "queue": {"queued": worker.queued(), "max": worker.max_queue, "running": running is not None},
                **worker.capabilities().to_dict(), "lora": worker.loras_supported, "auth": api_key is not None,
                "limits": {"max_pixels": max_pixels, "max_body_bytes": max_body_bytes,
                           "default_timeout": worker.default_timeout, "max_timeout": max_timeout,
                           "keep_seconds": worker.keep_seconds, "max_kept_bytes": worker.max_kept_bytes}}

    return app


def _blank(size: int):
    """A plain grey picture: the image of the request examples."""
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


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
    g.add_argument("--keep-seconds", type=float, default=600.0,
                   help="how long a finished job's results stay fetchable, however many jobs follow (default 600)")
    g.add_argument("--max-kept-mb", type=float, default=1024.0,
                   help="memory for finished jobs' results; when full, new jobs get HTTP 429 until the oldest "
                        "expire (default 1024)")
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
    from . import limits

    require_web_extra("fastapi", "uvicorn")
    # the HTTP schema bounds steps and images below the pipeline's limits; only the size is this server's own
    limits.set_current(limits.Limits(max_pixels=max(limits.Limits().max_pixels, args.max_pixels)))
    pipe = load(args)
    print(f"serving the API on http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    serve(pipe, host=args.host, port=args.port, api_key=args.api_key or None, max_queue=args.max_queue,
          default_timeout=args.timeout, max_timeout=args.max_timeout, max_pixels=args.max_pixels,
          max_body_bytes=int(args.max_body_mb * 1024 * 1024), keep_seconds=args.keep_seconds,
          max_kept_bytes=int(args.max_kept_mb * 1024 * 1024), lora_dir=args.lora_dir,
          extra_parameters=model_parameters(args, pipe))
    return 0
