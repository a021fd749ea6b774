"""The diffusion maths of Stable Cascade (the official "GDF"), as small pure functions.

Everything is expressed through the log signal-to-noise ratio λ of the cosine schedule: x_t = a·x0 + b·ε with
a² = sigmoid(λ), b² = sigmoid(-λ), t in [0, 1] (t = 1 is pure noise). `official-spec.md` §4 is the reference.

The samplers built on these functions are in `sampling`.
"""

from __future__ import annotations

import math

import torch

S = 0.008  # cosine schedule offset
ALPHA_BAR_RANGE = (1e-4, 0.9999)
_MIN_VAR = math.cos(S / (1 + S) * math.pi / 2) ** 2


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) of the clamped cosine schedule (float32, computed like diffusers' scheduler)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    s = torch.tensor(S)
    ab = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    return ab.clamp(*ALPHA_BAR_RANGE)


LOGSNR_MIN = math.log(ALPHA_BAR_RANGE[0] / (1 - ALPHA_BAR_RANGE[0]))  # λ(t=1) ≈ -9.21
LOGSNR_MAX = -LOGSNR_MIN  # λ(t=0) ≈ 9.21


def logsnr(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """λ(t) with the SNR divided by shift², clamped to the *unshifted* limits (as GDF does)."""
    ab = alpha_bar(t)
    lam = torch.log(ab / (1 - ab))
    if shift != 1:
        lam = lam + 2 * math.log(1 / shift)
    return lam.clamp(LOGSNR_MIN, LOGSNR_MAX)


def scales(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving signal and noise scales (a, b) for λ."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def noise_cond(lam: torch.Tensor) -> torch.Tensor:
    """What the networks receive as r: the t at which the unshifted cosine schedule has this λ."""
    var = torch.sigmoid(lam).clamp(0, 1)
    t = torch.acos((var * _MIN_VAR).sqrt()) / (math.pi / 2) * (1 + S) - S
    return t.clamp(0, 1)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x)


def diffuse(x0: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Noise clean latents to level λ (per sample)."""
    a, b = scales(lam)
    return _bcast(a, x0) * x0 + _bcast(b, x0) * eps


def target(x0: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor, kind: str = "eps") -> torch.Tensor:
    """Training target: ε ("eps", the released models) or v = a·ε − b·x0 ("v")."""
    if kind == "eps":
        return eps
    if kind == "v":
        a, b = scales(lam)
        return _bcast(a, x0) * eps - _bcast(b, x0) * x0
    raise ValueError(f"unknown target {kind!r}; use 'eps' or 'v'")


def undiffuse(x: torch.Tensor, lam: torch.Tensor, pred: torch.Tensor, kind: str = "eps"):
    """(x0, ε) from a network prediction of the given target kind."""
    a, b = (_bcast(v, x) for v in scales(lam))
    if kind == "eps":
        return (x - b * pred) / a, pred
    if kind == "v":  # a² + b² = 1 for the VP scales
        return a * x - b * pred, b * x + a * pred
    raise ValueError(f"unknown target {kind!r}; use 'eps' or 'v'")


def guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float, rho: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, optionally rescaled towards the conditional prediction's std (GDF's `cfg_rho`).

    GDF takes the std over the whole batch, so a sample depended on its batch mates; here it is per sample,
    which equals GDF for a batch of one."""
    pred = torch.lerp(pred_uncond, pred_cond, scale)
    if rho > 0:
        dims = tuple(range(1, pred.dim()))
        ratio = pred_cond.std(dim=dims, keepdim=True) / (pred.std(dim=dims, keepdim=True) + 1e-9)
        pred = rho * pred * ratio + (1 - rho) * pred
    return pred


def ddpm_step(x0, eps, lam, lam_next, noise):
    """GDF's DDPM update (DDIM with η = 1) from level λ to λ_next (scalars or per sample)."""
    a, b = (_bcast(v, x0) for v in scales(torch.as_tensor(lam)))
    a_next, b_next = (_bcast(v, x0) for v in scales(torch.as_tensor(lam_next)))
    sigma = (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt()
    return a_next * x0 + (b_next**2 - sigma**2).sqrt() * eps + sigma * noise


def wuerstchen_step(x, eps, t, t_next, noise):
    """diffusers' DDPMWuerstchenScheduler.step, written out (t scalar or per sample)."""
    ab, ab_next = _bcast(alpha_bar(t), x), _bcast(alpha_bar(t_next), x)
    alpha = ab / ab_next
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - ab).sqrt())
    std = ((1 - alpha) * (1.0 - ab_next) / (1.0 - ab)).sqrt()
    return mu + std * noise * _bcast((torch.as_tensor(t_next) != 0).float(), x)
