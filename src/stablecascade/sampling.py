"""The sampling core shared by the pipeline and the trainer: noise, the guided denoiser, the samplers, step events.

Device rules (what lets the same seed give the same image on any device, and the loop run without host syncs):
- every random draw comes from a CPU generator and is then moved to the latents' device; a generator of another
  device is replaced by a CPU one seeded with its seed;
- the noise schedule is computed once on the CPU and moved once; the noise condition r stays float32 on the
  model's device (the network embeds it in float32);
- no step reads a value back to the host: per-step Python branches depend on the step index only.

All samplers work in the GDF parameterisation of `diffusion`: x_t = a·x0 + b·ε with λ = log(a²/b²). The k-style
samplers (Euler, Euler ancestral, DPM++ 2M) integrate in σ = b/a with x/a as the state, which is the form
k-diffusion uses; their last step goes to σ = 0, so `steps` model calls give the final x0 as the official sampler.
"lcm" is multistep consistency sampling for consistency-distilled stages (`consistency_x0`, `train lcm`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from . import diffusion
from .errors import CheckpointError
from .settings import DEFAULTS

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class StepEvent:
    """What `step_callback` receives after each sampling step; raising from the callback stops the run."""

    stage: str  # "prior" (Stage C) or "decoder" (Stage B)
    step: int  # steps done, 1-based
    total: int  # steps of this stage in this run
    x0: torch.Tensor  # the current clean-latent estimate (B,C,h,w), on the pipeline's device


StepCallback = Callable[[StepEvent], None]


# ------------------------------------------------------------------------------------------------------- noise
def cpu_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """`generator` itself if it is a CPU one; else a CPU generator seeded with its seed, so a CUDA generator
    seeded with s draws exactly what `torch.Generator().manual_seed(s)` draws."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def cpu_generators(generator: Generators) -> Generators:
    if isinstance(generator, (list, tuple)):
        return [cpu_generator(g) for g in generator]
    return cpu_generator(generator)


def seeded(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn(shape, generator: Generators = None, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn in float32 on the CPU, then moved. With one generator per image (a list), row i
    comes from generator i alone, so an image's noise does not depend on its batch mates."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per image")
        noise = torch.stack([torch.randn(shape[1:], generator=cpu_generator(g)) for g in generator])
    else:
        noise = torch.randn(shape, generator=cpu_generator(generator))
    return noise.to(device=device, dtype=dtype)


def generator_states(generator: Generators):
    """A snapshot to rewind the generators with `restore_generators` (used to rerun a stage)."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    return [None if g is None else g.get_state() for g in gens]


def restore_generators(generator: Generators, states) -> None:
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    for g, state in zip(gens, states):
        if g is not None:
            g.set_state(state)


# ------------------------------------------------------------------------------------ settings of a model
PREDICTION_KEY, SHIFT_KEY = "stablecascade.prediction", "stablecascade.sampling_shift"


def model_metadata(prediction: str, shift: float) -> dict:
    """safetensors metadata recording what a model predicts ("eps" or "v") and the schedule shift it samples at."""
    return {PREDICTION_KEY: prediction, SHIFT_KEY: repr(float(shift))}


def read_model_metadata(path) -> dict:
    """{"prediction", "shift", "consistency"} as far as a safetensors file records them ({} for other files)."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    found = {}
    if meta.get(PREDICTION_KEY) in ("eps", "v"):
        found["prediction"] = meta[PREDICTION_KEY]
    if SHIFT_KEY in meta:
        found["shift"] = float(meta[SHIFT_KEY])
    consistency = read_consistency(meta, str(path))
    if consistency is not None:
        found["consistency"] = consistency
    return found


# A consistency-distilled stage (`train lcm`) says so in its file's metadata, as JSON: {"kind": "lcm", "stage":
# "prior"|"decoder", "steps": recommended steps, "guidance": the guidance to sample at, "teacher_guidance": the
# guidance the teacher was distilled with}. A pipeline holding such a LoRA or stage file samples that stage with "lcm".
CONSISTENCY_KEY = "stablecascade.consistency"


@dataclass(frozen=True)
class Consistency:
    stage: str  # "prior" (Stage C) or "decoder" (Stage B)
    steps: int
    guidance: float


def consistency_metadata(stage: str, steps: int, guidance: float, teacher_guidance: float) -> dict:
    return {CONSISTENCY_KEY: json.dumps({"kind": "lcm", "stage": stage, "steps": int(steps),
                                         "guidance": float(guidance), "teacher_guidance": float(teacher_guidance)})}


def read_consistency(meta: dict, source: str) -> Optional[Consistency]:
    """The `Consistency` a file's metadata records (None when it is no consistency model); CheckpointError when the
    record is broken."""
    if CONSISTENCY_KEY not in meta:
        return None
    try:
        record = json.loads(meta[CONSISTENCY_KEY])
        found = Consistency(str(record["stage"]), int(record["steps"]), float(record["guidance"]))
        ok = record["kind"] == "lcm" and found.stage in ("prior", "decoder") and found.steps >= 1 and \
            math.isfinite(found.guidance) and found.guidance >= 0
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: metadata {CONSISTENCY_KEY!r} is not a consistency record ({e!r})") from None
    if not ok:
        raise CheckpointError(f"{source}: metadata {CONSISTENCY_KEY!r} holds unusable values: {record}")
    return found


def consistency_plan(consistency: Optional[Consistency], sampler: str, steps: int, guidance: Optional[float],
                     default_steps: int, default_guidance: Optional[float]) -> tuple[str, int, Optional[float]]:
    """(sampler, steps, guidance) for a stage: a consistency-distilled one (its LoRA loaded, or its file says so)
    samples with "lcm" at its recommended steps and guidance, unless the call chose another sampler, or steps or
    guidance other than the defaults."""
    if consistency is None or sampler not in (DEFAULTS.sampler, "lcm"):
        return sampler, steps, guidance
    return ("lcm", consistency.steps if steps == default_steps else steps,
            consistency.guidance if guidance == default_guidance else guidance)


# ------------------------------------------------------------------------------------------- guided denoiser
def _cast(value, dtype):
    """Floating tensors (also inside lists) cast to dtype."""
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _concat(cond, uncond):
    """The [cond; uncond] batch of one model input (ControlNet lists element-wise, None kept)."""
    if isinstance(cond, list):
        return [None if c is None else torch.cat([c, u]) for c, u in zip(cond, uncond)]
    return torch.cat([cond, uncond])


class GuidedDenoiser:
    """A stage's prediction for (x, r), with classifier-free guidance (active when scale > 1) batched into one
    model call and GDF's `cfg_rho` rescale. Returns the model's raw prediction (ε or v); `sample` converts it.

    `precompute` projects the condition once for all steps (the model's `precompute`); call `prepare()` again
    after changing the model's dtype. `context` wraps each model call (the trainer's autocast)."""

    def __init__(self, model, cond: dict, uncond: Optional[dict] = None, scale: float = 1.0, rho: float = 0.0, *,
                 precompute: bool = True, context: Callable[[], contextlib.AbstractContextManager] = None):
        self.model, self.scale, self.rho = model, scale, rho
        self.guided = uncond is not None and scale > 1
        self.raw = {k: _concat(cond[k], uncond[k]) for k in cond} if self.guided else dict(cond)
        self.use_precompute, self.context = precompute, context or contextlib.nullcontext
        self.prepare()

    def prepare(self) -> None:
        dtype = next(self.model.parameters()).dtype
        raw = _cast(self.raw, dtype)
        self.inputs = self.model.precompute(raw) if self.use_precompute else raw

    def __call__(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.guided:
            x, r = torch.cat([x, x]), torch.cat([r, r])
        dtype = next(self.model.parameters()).dtype
        with self.context():
            pred = self.model(x.to(dtype), r, **self.inputs).float()
        if not self.guided:
            return pred
        pred_cond, pred_uncond = pred.chunk(2)
        return diffusion.guidance(pred_cond, pred_uncond, self.scale, self.rho)


# ----------------------------------------------------------------------------------------------- samplers
@dataclass(frozen=True)
class Sampler:
    """A registry entry. `run(denoise, x, lams, ts, steps, target, noise, callback)` returns the sample.
    `model_shifts`: sample on the models' own schedule shifts (else shift 1); `rho`: the CFG std rescale."""

    name: str
    label: str  # the name AUTOMATIC1111/ComfyUI users know
    run: Callable
    model_shifts: bool = True
    rho: float = 0.7
    stochastic: bool = False  # draws noise at each step


def _lambda_loop(update, consistency: bool = False):
    """A sampler stepping in λ: the model's x0 and ε at each level (with `consistency`, the consistency function's
    estimate), `update(x0, ε, λ, λ_next, noise)` to the next; the result is the last step's x0 estimate (GDF's final
    update is discarded)."""

    def run(denoise, x, lams, ts, steps, target, noise, callback):
        batch = x.shape[0]
        for i in range(steps):
            lam = lams[i].expand(batch)
            pred = denoise(x, diffusion.noise_cond(lam))
            x0, eps = consistency_x0(x, lam, ts[i].expand(batch), pred, target) if consistency else \
                diffusion.undiffuse(x, lam, pred, target)
            callback(i, x0)
            if i < steps - 1:
                x = update(x0, eps, lams[i].to(x), lams[i + 1].to(x), noise)
        return x0

    return run


def _ddpm(x0, eps, lam, lam_next, noise):
    """GDF's DDPM step (the official sampler)."""
    return diffusion.ddpm_step(x0, eps, lam, lam_next, noise())


def _ddim(x0, eps, lam, lam_next, noise):
    """DDIM (η = 0): deterministic. In σ = b/a this update is exactly an Euler step, so "ddim" and "euler" agree
    (DDIM is kept under the name users look for)."""
    a_next, b_next = diffusion.scales(lam_next)
    return a_next * x0 + b_next * eps


# Consistency models (Song et al. 2023; LCM, Luo et al. 2023) parameterise the consistency function as
# f(x_t, t) = c_skip(t)·x_t + c_out(t)·F(x_t, t), so that f(x, 0) = x holds by construction. Here F is the stage's
# x0 estimate from its ε/v prediction and t the position on the sampling schedule (1 = pure noise, 0 = its clean
# end, which the clamped, shifted schedule reaches with a little noise left: as in LCM, whose last timestep keeps
# some). LCM's scales on its 1000-step schedule with timestep scaling 10 become, on t in [0, 1],
# c_skip = σd²/((Kt)² + σd²) and c_out = Kt/√((Kt)² + σd²) with K = 10⁴.
CONSISTENCY_SIGMA_DATA, CONSISTENCY_TIME_SCALE = 0.5, 10_000.0


def consistency_scales(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at schedule position t: (1, 0) at t = 0, → (0, 1) as t grows."""
    scaled = t * CONSISTENCY_TIME_SCALE
    denom = scaled**2 + CONSISTENCY_SIGMA_DATA**2
    return CONSISTENCY_SIGMA_DATA**2 / denom, scaled / denom.sqrt()


def consistency_x0(x: torch.Tensor, lam: torch.Tensor, t: torch.Tensor, pred: torch.Tensor, target: str = "eps"):
    """(f(x, t), ε) for a consistency-distilled stage: the consistency function's clean-latent estimate from the
    stage's raw prediction at level λ and schedule position t (per sample), and the ε the prediction implies."""
    x0, eps = diffusion.undiffuse(x, lam, pred, target)
    c_skip, c_out = (diffusion._bcast(c, x) for c in consistency_scales(t))
    return c_skip * x + c_out * x0, eps


def _renoise(x0, eps, lam, lam_next, noise):
    """Multistep consistency sampling: noise the estimate afresh to the next level."""
    a_next, b_next = diffusion.scales(lam_next)
    return a_next * x0 + b_next * noise()


def _diffusers(denoise, x, lams, ts, steps, target, noise, callback):
    """diffusers' DDPMWuerstchenScheduler: r = t, no shift, the last μ as the result, one normal per step."""
    batch = x.shape[0]
    for i in range(steps):
        r = ts[i].expand(batch)
        pred = denoise(x, r)
        lam = diffusion.logsnr(r)
        x0, eps = diffusion.undiffuse(x, lam, pred, target)
        if target == "eps":
            eps = pred
        callback(i, x0)
        x = diffusion.wuerstchen_step(x, eps, ts[i].to(x), ts[i + 1].to(x), noise())
    return x


def _sigma_loop(update):
    """A k-style sampler: state x/a, noise level σ = b/a ending at 0 after `steps` model calls."""

    def run(denoise, x, lams, ts, steps, target, noise, callback):
        batch = x.shape[0]
        sigmas = torch.cat([torch.exp(-lams[:steps] / 2), lams.new_zeros(1)])
        a0, _ = diffusion.scales(lams[0])
        state, memory = x / a0, {}
        for i in range(steps):
            lam = lams[i].expand(batch)
            a, _ = diffusion.scales(lams[i])
            x_vp = state * a
            x0, _ = diffusion.undiffuse(x_vp, lam, denoise(x_vp, diffusion.noise_cond(lam)), target)
            callback(i, x0)
            state = update(i, steps, state, x0, sigmas, lams, noise, memory)
        return state

    return run


def _euler(i, steps, x, x0, sigmas, lams, noise, memory):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    return x + (x - x0) / sigma * (sigma_next - sigma)


def _euler_ancestral(i, steps, x, x0, sigmas, lams, noise, memory):
    """Step down to σ_down deterministically, then add fresh noise of std σ_up (σ_down² + σ_up² = σ_next²). With
    this η = 1 split it is the DDPM posterior step written in σ; it differs from "official" only in rounding."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    sigma_up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    x = x + (x - x0) / sigma * (sigma_down - sigma)
    if i < steps - 1:  # the last step lands on σ = 0: no noise
        x = x + noise() * sigma_up
    return x


def _dpmpp_2m(i, steps, x, x0, sigmas, lams, noise, memory):
    """DPM-Solver++(2M): exponential integrator in log σ, with a second-order correction from the previous x0."""
    previous = memory.get("x0")
    memory["x0"] = x0
    if i == steps - 1:  # to σ = 0 the update is x0 itself
        return x0
    half_lam, half_lam_next = lams[i] / 2, lams[i + 1] / 2  # -log σ
    h = half_lam_next - half_lam
    if previous is not None:
        ratio = (half_lam - lams[i - 1] / 2) / h
        x0 = (1 + 1 / (2 * ratio)) * x0 - previous / (2 * ratio)
    return sigmas[i + 1] / sigmas[i] * x - torch.expm1(-h) * x0


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("official", "DDPM (official)", _lambda_loop(_ddpm), stochastic=True),
    Sampler("diffusers", "DDPM (diffusers)", _diffusers, model_shifts=False, rho=0.0, stochastic=True),
    Sampler("ddim", "DDIM", _lambda_loop(_ddim)),
    Sampler("euler", "Euler", _sigma_loop(_euler)),
    Sampler("euler_a", "Euler a", _sigma_loop(_euler_ancestral), stochastic=True),
    Sampler("dpmpp_2m", "DPM++ 2M", _sigma_loop(_dpmpp_2m)),
    Sampler("lcm", "LCM", _lambda_loop(_renoise, consistency=True), stochastic=True),
)}


def get(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(denoise: Denoiser, x: torch.Tensor, steps: int, *, sampler: str = "official", shift: float = 1.0,
           t_start: float = 1.0, target: str = "eps", generator: Generators = None,
           callback: Optional[Callback] = None) -> torch.Tensor:
    """Run the reverse process from x (noised to t_start) down to 0 in `steps` model calls.

    `denoise(x, r)` returns the model's (guided) prediction of kind `target` ("eps" or "v") for the noise
    condition r (B,) (float32, on x's device). `callback(i, x0)` sees the x0 estimate after step i (0-based).
    `generator`: one CPU generator, or one per image (see `randn`)."""
    spec = get(sampler)
    if not spec.model_shifts and shift != 1:
        raise ValueError(f"sampler {sampler!r} has no shift; use shift=1")
    if target not in ("eps", "v"):
        raise ValueError(f"unknown target {target!r}; use 'eps' or 'v'")
    ts = torch.linspace(t_start, 0.0, steps + 1)
    lams = diffusion.logsnr(ts, shift).to(x.device)
    generator = cpu_generators(generator)

    def noise():
        return randn(x.shape, generator, device=x.device).to(x)

    return spec.run(denoise, x, lams, ts.to(x.device), steps, target, noise, callback or (lambda i, x0: None))
