"""The subset of AUTOMATIC1111's web API (`/sdapi/v1`) that clients use for text-to-image and image-to-image, so
tools written for it (the `webuiapi` package, editor plug-ins, bots) work unchanged.

Its fields map onto Stable Cascade's stages: `steps` and `cfg_scale` are Stage C's (the prior, which draws the
picture), `batch_size` x `n_iter` images are made in one job, `seed` -1 is random and image i gets seed + i,
`sampler_name` is a sampler's A1111 name ("Euler a", ...) or its stablecascade name, `denoising_strength` is
img2img's strength. Stage B's steps and guidance come from the server options (`decoder_steps`,
`decoder_cfg_scale`, null for the pipeline's default for the sampler; GET/POST /sdapi/v1/options) or a request's
`override_settings`. Requests go through the same
API key (also accepted as HTTP Basic auth's password, which is how A1111 clients send credentials), queue and
limits as /v1. Fields A1111 has and Stable Cascade does not (hires fix, face restoration, scripts) are ignored.
"""


import base64
import json
import math
import secrets
import time
from typing import Callable, Optional

from .errors import InputError
from .images import infotext, png_bytes


def sampler_names() -> dict:
    """A1111 display name -> stablecascade sampler name, for every sampler of the registry."""
    from .sampling import SAMPLERS

    return {spec.label: name for name, spec in SAMPLERS.items()}


def resolve_sampler(name: Optional[str], default: str) -> str:
    """The registry name of a sampler given by its A1111 label or its own name (None: `default`)."""
    if not name:
        return default
    labels = sampler_names()
    by_label = {label.lower(): registry for label, registry in labels.items()}
    if name.lower() in by_label:
        return by_label[name.lower()]
    if name in labels.values():
        return name
    raise InputError(f"unknown sampler_name {name!r}; use one of {', '.join(labels)} (GET /sdapi/v1/samplers)")


def build_router(worker, *, dependencies: list, decode: Callable, check_size: Callable, enqueue: Callable,
                 finished: Callable, model_name: str):
    """The /sdapi/v1 routes, behind the /v1 routes' `dependencies` (the key) and helpers of `server.create_app`:
    `decode(data, name)` (base64 -> PIL image within the limits), `check_size(w, h)`, `enqueue(mode, kwargs,
    summary)` (-> Job, or the HTTP error) and `await finished(job, timeout)`."""
    from fastapi import APIRouter, HTTPException
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool

    from .geometry import default_size
    from .server import FAILURE_STATUS
    from .settings import DEFAULTS

    pipe = worker.pipe
    native = pipe.native_size
    options = {"sd_model_checkpoint": model_name, "decoder_steps": DEFAULTS.decoder_steps,
               "decoder_cfg_scale": None, "samples_format": "png"}  # None: the pipeline's default for the sampler

    class Txt2ImgRequest(BaseModel):
        """AUTOMATIC1111's txt2img request; its other fields are accepted and ignored."""

        model_config = ConfigDict(extra="allow")
        prompt: str = Field("", description="what to draw")
        negative_prompt: str = ""
        steps: int = Field(DEFAULTS.prior_steps, ge=1, le=200, description="Stage C steps")
        cfg_scale: float = Field(DEFAULTS.prior_guidance, ge=0, le=50, description="Stage C guidance")
        width: int = Field(native, ge=8, le=8192, multiple_of=8)
        height: int = Field(native, ge=8, le=8192, multiple_of=8)
        seed: int = Field(-1, ge=-1, le=2**31 - 1, description="-1: random; image i gets seed + i")
        batch_size: int = Field(1, ge=1, le=8)
        n_iter: int = Field(1, ge=1, le=8)
        sampler_name: Optional[str] = Field(None, description="e.g. \"Euler a\" (GET /sdapi/v1/samplers)")
        override_settings: dict = Field(default_factory=dict, description="decoder_steps, decoder_cfg_scale")
        send_images: bool = True

    class Img2ImgRequest(Txt2ImgRequest):
        init_images: list[str] = Field(..., min_length=1, description="base64 images (the first one is used)")
        denoising_strength: float = Field(0.75, ge=0, le=1)
        width: Optional[int] = Field(None, ge=8, le=8192, multiple_of=8, description="default: the input's")
        height: Optional[int] = Field(None, ge=8, le=8192, multiple_of=8)

    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"], dependencies=dependencies)

    def prepare(body, kwargs: dict) -> tuple:
        stage_b = {**options, **{k: v for k, v in body.override_settings.items() if k in options}}
        if stage_b["sd_model_checkpoint"] != model_name:
            raise HTTPException(422, f"this server serves {model_name!r} only")
        try:
            sampler = resolve_sampler(body.sampler_name, DEFAULTS.sampler)
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        seed = secrets.randbelow(2**31) if body.seed == -1 else body.seed
        check_size(kwargs["width"], kwargs["height"])
        kwargs.update(prompt=body.prompt, negative_prompt=body.negative_prompt, prior_steps=body.steps,
                      prior_guidance=body.cfg_scale, decoder_steps=int(stage_b["decoder_steps"]),
                      decoder_guidance=pipe.default_decoder_guidance(sampler) if stage_b["decoder_cfg_scale"] is None
                      else float(stage_b["decoder_cfg_scale"]),
                      num_images_per_prompt=body.batch_size * body.n_iter, seed=seed, sampling=sampler)
        return kwargs, {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}

    async def run(mode: str, body, kwargs: dict, extra_info: dict) -> dict:
        kwargs, summary = prepare(body, kwargs)
        job = enqueue(mode, kwargs, summary)
        await finished(job, max(0.0, job.deadline - time.monotonic()) + 60)
        if job.status == "failed":
            raise HTTPException(FAILURE_STATUS.get(job.error["type"], 500), job.error["message"])
        params = job.parameters
        seeds = [p.get("seed", kwargs["seed"]) for p in params] or [kwargs["seed"]]
        count = len(params)
        info = {"prompt": body.prompt, "all_prompts": [body.prompt] * count, "negative_prompt": body.negative_prompt,
                "all_negative_prompts": [body.negative_prompt] * count, "seed": seeds[0], "all_seeds": seeds,
                "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
                "width": kwargs["width"], "height": kwargs["height"], "sampler_name": _label(kwargs["sampling"]),
                "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
                "n_iter": body.n_iter, "sd_model_name": model_name, "decoder_steps": kwargs["decoder_steps"],
                "decoder_cfg_scale": kwargs["decoder_guidance"], "infotexts": [infotext(p) for p in params],
                "styles": [], "index_of_first_image": 0, "interrupted": job.status == "cancelled",
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), **extra_info}
        images = [base64.b64encode(png).decode() for png in job.pngs] if body.send_images else []
        return {"images": images, "parameters": body.model_dump(exclude={"init_images"}), "info": json.dumps(info)}

    @router.post("/txt2img", summary="text-to-image (AUTOMATIC1111 fields)")
    async def txt2img(body: Txt2ImgRequest) -> dict:
        return await run("txt2img", body, {"width": body.width, "height": body.height}, {})

    @router.post("/img2img", summary="image-to-image (AUTOMATIC1111 fields)")
    async def img2img(body: Img2ImgRequest) -> dict:
        image = await run_in_threadpool(decode, body.init_images[0], "init_images[0]")
        w, h = default_size(*image.size)
        kwargs = {"image": image, "strength": body.denoising_strength, "width": body.width or w,
                  "height": body.height or h}
        return await run("img2img", body, kwargs, {"denoising_strength": body.denoising_strength})

    @router.get("/progress", summary="the running job's progress, ETA and latest preview")
    def progress(skip_current_image: bool = False) -> dict:
        job = worker.running
        queued = worker.queued()
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": queued,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        with job.changed:
            p = dict(job.progress)
            preview = job.preview
        image = None
        if preview is not None and not skip_current_image:
            image = base64.b64encode(png_bytes(preview, {"mode": "preview", **p})).decode()
        return {"progress": p.get("percent", 0.0) / 100, "eta_relative": p.get("eta", 0.0) or 0.0,
                "current_image": image, "textinfo": p.get("stage"),
                "state": {"skipped": False, "interrupted": job.cancel_requested.is_set(), "job": job.id,
                          "job_count": queued + 1, "job_timestamp": time.strftime("%Y%m%d%H%M%S",
                                                                                  time.localtime(job.created)),
                          "job_no": 0, "sampling_step": p.get("step", 0), "sampling_steps": p.get("total", 0)}}

    @router.post("/interrupt", summary="stop the running job at its next step")
    def interrupt() -> dict:
        job = worker.running
        if job is not None:
            worker.cancel(job.id)
        return {}

    @router.get("/sd-models", summary="the loaded model")
    def sd_models() -> list[dict]:
        return [{"title": model_name, "model_name": model_name, "hash": None, "sha256": None,
                 "filename": model_name, "config": None}]

    @router.get("/samplers", summary="the samplers, by their AUTOMATIC1111 names")
    def samplers() -> list[dict]:
        return [{"name": label, "aliases": [name], "options": {}} for label, name in sampler_names().items()]

    @router.get("/options", summary="server options (model, Stage B steps and guidance)")
    def get_options() -> dict:
        return dict(options)

    @router.post("/options", summary="change server options")
    def set_options(changes: dict) -> None:
        known = {k: v for k, v in changes.items() if k in options}
        if known.get("sd_model_checkpoint", model_name) != model_name:
            raise HTTPException(422, f"this server serves {model_name!r} only")
        for key, limit in (("decoder_steps", 200), ("decoder_cfg_scale", 50)):
            if key in known and not (isinstance(known[key], (int, float)) and math.isfinite(known[key])
                                     and 0 <= known[key] <= limit) and (key, known[key]) != ("decoder_cfg_scale", None):
                raise HTTPException(422, f"{key} must be a number from 0 to {limit}")
        options.update(known)

    return router


def _label(sampling: str) -> str:
    from .sampling import SAMPLERS

    return SAMPLERS[sampling].label
