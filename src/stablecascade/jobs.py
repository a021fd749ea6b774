"""The job queue shared by the HTTP API (`server.py`) and the web UI (`webui.py`).

One `Worker` thread owns the pipeline and runs jobs one at a time from a bounded queue (torch is not safe for
concurrent generation on one model). Jobs have ids, a status (queued / running / done / failed / cancelled),
progress, cancellation (a queued job is dropped, a running one stops at its next sampling step) and a timeout
counted from submission; their results are kept as PNG bytes (parameters in the text chunks).
"""

import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import InputError, StableCascadeError, UnsupportedError
from .images import png_bytes

log = logging.getLogger(__name__)

MODES = ("txt2img", "img2img", "variation", "controlnet")
JOB_OVERHEAD_BYTES = 64 * 1024  # a finished job without images: the object, two prompts, its parameters


class QueueFull(StableCascadeError):
    """The job queue (or the memory kept for finished jobs' results) is full; try again in `retry_after` seconds
    (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


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

    @property
    def kept_bytes(self) -> int:
        """Memory the job holds once finished: its PNGs plus a bound on the object and its request summary."""
        return JOB_OVERHEAD_BYTES + sum(map(len, self.pngs)) + sum(map(len, self.control_pngs))

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

    `submit` raises `QueueFull` when `max_queue` jobs are already waiting. A finished job is kept `keep_seconds`
    after it ends, however many jobs follow, so its results can be fetched; memory stays bounded because `submit`
    also raises `QueueFull` while the kept jobs hold `max_kept_bytes` or more (until the oldest expire).
    `extra_parameters` (model names, dtype...) are added to every image's parameters."""

    def __init__(self, pipe, *, max_queue: int = 8, keep_seconds: float = 600.0,
                 max_kept_bytes: int = 1024 * 1024 * 1024, default_timeout: float = 600.0,
                 extra_parameters: Optional[dict] = None):
        if max_queue < 1:
            raise InputError("max_queue must be at least 1")
        if not keep_seconds > 0 or max_kept_bytes < 1:
            raise InputError("keep_seconds and max_kept_bytes must be positive")
        self.pipe = pipe
        self.max_queue, self.default_timeout = max_queue, default_timeout
        self.keep_seconds, self.max_kept_bytes = keep_seconds, max_kept_bytes
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
    def capabilities(self):
        """What the pipeline can run and why not (`capabilities.Capabilities`)."""
        return self.pipe.capabilities()

    @property
    def loras_supported(self) -> bool:
        return callable(getattr(self.pipe, "load_lora", None))

    def submit(self, mode: str, kwargs: dict, *, request: Optional[dict] = None, timeout: Optional[float] = None,
               previews: bool = False, loras=()) -> Job:
        """Queue a job: `mode` is one of MODES, `kwargs` the pipeline method's keyword arguments (for
        "controlnet" including `kind` and `control`). `loras`: (path, scale) pairs merged for this job."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; use one of {list(MODES)}")
        caps = self.capabilities()
        reason = caps.controlnet_reason(kwargs.get("kind")) if mode == "controlnet" else caps.reason(mode)
        if reason:
            raise UnsupportedError(f"{kwargs.get('kind', '')} {mode} cannot run on this model: {reason}".lstrip())
        if loras and not self.loras_supported:
            raise UnsupportedError("this pipeline cannot load LoRAs")
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
            self._forget_old()
            kept = sum(j.kept_bytes for j in self._jobs.values() if j.done)
            if kept >= self.max_kept_bytes:
                wait = min(j.finished for j in self._jobs.values() if j.done) + self.keep_seconds - time.time()
                raise QueueFull(f"finished jobs' results fill this server's {self.max_kept_bytes // 2**20} MB "
                                f"(each is kept {self.keep_seconds:g} s); try again in {wait:.0f} s",
                                retry_after=max(1, math.ceil(wait)))
            self._queue.append(job)
            self._jobs[job.id] = job
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            self._forget_old()
            return self._jobs.get(job_id)

    def jobs(self) -> list:
        with self._lock:
            self._forget_old()
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
        """Drop the jobs that finished more than `keep_seconds` ago (call with the lock held)."""
        expired = time.time() - self.keep_seconds
        for job in [j for j in self._jobs.values() if j.done and j.finished < expired]:
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
        """Called by the pipeline after every sampling step (a `sampling.StepEvent`): progress with the overall
        percent and an ETA from the pace so far; a cancelled or timed-out job stops here."""
        decoder_total = int(job.kwargs.get("decoder_steps", 0))
        prior_total = [int(job.kwargs.get("prior_steps", 0))]  # the first prior event gives the real count

        def on_step(event):
            self._check(job)
            if event.stage == "prior":
                prior_total[0] = event.total
                done, total = event.step, event.total + decoder_total
            else:
                done, total = prior_total[0] + event.step, prior_total[0] + event.total
            elapsed = time.time() - (job.started or time.time())
            job._update(progress={"stage": event.stage, "step": event.step, "total": event.total,
                                  "percent": round(100 * done / max(total, 1), 1),
                                  "eta": round(elapsed * (total - done) / done, 2) if done else None})

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
        except UnsupportedError as e:
            job._update(status="failed", finished=time.time(), error={"type": "unsupported", "message": str(e)})
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
