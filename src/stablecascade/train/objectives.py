"""Training-side diffusion pieces (the official `gdf/` and `train/`): the training t draw, loss weights
(P2 and the adaptive per-logSNR-bucket weight), pyramid noise, fresh-model initialisation and EMA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import logsnr


def draw_t(n: int, gen: torch.Generator) -> torch.Tensor:
    """The cosine schedule's training draw: t = clamp(1 − U[0,1) + 0.001, 0.001, 1)."""
    return (1 - torch.rand(n, generator=gen) + 0.001).clamp(0.001, 1.0)


def training_logsnr(n: int, gen: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    return logsnr(draw_t(n, gen), shift)


def p2_weight(lam: torch.Tensor) -> torch.Tensor:
    """P2LossWeight(k=1, gamma=1, s=1) = 1 / (1 + SNR)."""
    return 1.0 / (1.0 + lam.exp())


class AdaptiveLossWeight:
    """Per-λ-bucket EMA of the raw loss; the weight is its reciprocal, so every noise level contributes alike.

    Unlike the official update (duplicate bucket indices in a batch: last write wins), every sample updates its
    bucket in turn, and in distributed runs the update sees the whole global batch, in rank order."""

    def __init__(self, buckets: int = 300, logsnr_range=(-10.0, 10.0), weight_range=(1e-7, 1e7), beta: float = 0.99):
        self.boundaries = torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1)
        self.losses = torch.ones(buckets, dtype=torch.float64)
        self.weight_range, self.beta = weight_range, beta

    def _index(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.boundaries, lam.detach().float().cpu())

    def __call__(self, lam: torch.Tensor) -> torch.Tensor:
        w = (1.0 / self.losses[self._index(lam)]).clamp(*self.weight_range)
        return w.float().to(lam.device)

    def update(self, lam: torch.Tensor, loss: torch.Tensor) -> None:
        idx = self._index(lam).tolist()
        values = loss.detach().double().cpu().tolist()
        for i, v in zip(idx, values):
            if math.isfinite(v):
                self.losses[i] = self.beta * self.losses[i] + (1 - self.beta) * v

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone()}

    def load_state_dict(self, s: dict) -> None:
        self.losses = s["losses"].clone().to(torch.float64)


def pyramid_noise(shape, gen: torch.Generator, discount: float = 0.75, levels: int = 9) -> torch.Tensor:
    """Stage B's multi-scale noise: N(0,1) plus nearest-upsampled coarse noise at halved sizes (weights 0.75^i,
    only for sizes up to 16), renormalised to unit variance. Uses both height and width (the official code used
    the height twice)."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=gen)
    total = 1.0
    for i in range(1, levels + 1):
        hi, wi = h // 2**i, w // 2**i
        if hi < 1 or wi < 1:
            break
        if max(hi, wi) <= 16:
            m = discount**i
            coarse = torch.randn(b, c, hi, wi, generator=gen)
            noise = noise + m * F.interpolate(coarse, (h, w), mode="nearest")
            total += m * m
        if min(hi, wi) <= 1:
            break
    return noise / math.sqrt(total)


# ---------------------------------------------------------------------------------------------- init / EMA
def init_unet_(model: nn.Module) -> nn.Module:
    """The official from-scratch initialisation of Stage B/C (the official modules' `_init_weights`)."""
    from ..models.blocks import GlobalResponseNorm, MultiheadAttention, ResBlock, TimestepBlock

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name in ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", "clip_mapper"):
        if hasattr(model, name):
            nn.init.normal_(getattr(model, name).weight, std=0.02)
    for name in ("effnet_mapper", "pixels_mapper"):
        if hasattr(model, name):
            for m in getattr(model, name).modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.02)
    nn.init.xavier_uniform_(model.embedding[1].weight, gain=0.02)
    nn.init.zeros_(model.clf[1].weight)
    depth = sum(model.config.blocks[0])
    for m in model.modules():
        if isinstance(m, ResBlock):
            m.channelwise[-1].weight.data.mul_(math.sqrt(1 / depth))
        elif isinstance(m, TimestepBlock):
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.zeros_(lin.weight)
        elif isinstance(m, GlobalResponseNorm):
            nn.init.zeros_(m.gamma)
            nn.init.zeros_(m.beta)
        elif isinstance(m, MultiheadAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
    return model


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema = β·ema + (1−β)·model over parameters and floating buffers (β = 0: hard copy)."""
    for (_, e), (_, p) in zip(ema.state_dict(keep_vars=True).items(), model.state_dict(keep_vars=True).items()):
        if e.dtype.is_floating_point:
            e.data.mul_(beta).add_(p.data.to(e.dtype), alpha=1 - beta)
        else:
            e.data.copy_(p.data)
