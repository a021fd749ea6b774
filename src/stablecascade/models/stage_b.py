"""Stage B: the diffusion decoder from a Stage C latent to Stage A's latent space (official `modules/stage_b.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import StageBConfig
from .blocks import CascadeUNet, LayerNorm2d, Linear


def _mapper(c_in: int, c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c * 4, 1), nn.GELU(), nn.Conv2d(c * 4, c, 1), LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
    )


def _resize(x, size):
    return F.interpolate(x.float(), size, mode="bilinear", align_corners=True)


class StageB(CascadeUNet):
    def __init__(self, config: StageBConfig):
        super().__init__()
        self.config = cfg = config
        c0, p, ch = cfg.c_hidden[0], cfg.patch_size, cfg.c_hidden
        if cfg.c_effnet is not None:
            self.effnet_mapper = _mapper(cfg.c_effnet, c0)
        if cfg.c_pixels is not None:
            self.pixels_mapper = _mapper(cfg.c_pixels, c0)
        self.clip_mapper = Linear(cfg.c_clip, cfg.c_cond * cfg.c_clip_seq)
        self.clip_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p**2, c0, 1), LayerNorm2d(c0, elementwise_affine=False, eps=1e-6)
        )
        self._build_levels(
            cfg,
            downscaler=lambda i: nn.Sequential(
                LayerNorm2d(ch[i - 1], elementwise_affine=False, eps=1e-6), nn.Conv2d(ch[i - 1], ch[i], 2, stride=2)
            ),
            upscaler=lambda i: nn.Sequential(
                LayerNorm2d(ch[i], elementwise_affine=False, eps=1e-6), nn.ConvTranspose2d(ch[i], ch[i - 1], 2, stride=2)
            ),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c0, elementwise_affine=False, eps=1e-6), nn.Conv2d(c0, cfg.c_out * p**2, 1), nn.PixelShuffle(p)
        )

    condition_inputs = ("clip",)

    def condition(self, clip) -> torch.Tensor:
        """`c_clip_seq` condition tokens from the pooled text embedding (B,1,c_clip)."""
        return self.clip_norm(self.clip_mapper(clip).reshape(clip.shape[0], -1, self.config.c_cond))

    def forward(self, x, r, effnet, clip=None, pixels=None, sca=None, cond_kv=None):
        """x (B,4,H/4,W/4), r (B,), effnet (B,16,h,w) of any size, clip (B,1,1280) -> ε.
        `cond_kv` (from `precompute`) replaces `clip`."""
        r_embed = self.embed_r(r, sca=sca)
        cond = self.condition(clip) if cond_kv is None else cond_kv
        x = self.embedding(x)
        size = x.shape[-2:]
        if hasattr(self, "effnet_mapper"):
            x = x + self.effnet_mapper(_resize(effnet, size).to(x.dtype))
        if hasattr(self, "pixels_mapper"):
            if pixels is None:  # never supplied by the released flows, but its mapped constant still counts
                pixels = x.new_zeros(x.shape[0], self.config.c_pixels, 8, 8)
            x = x + _resize(self.pixels_mapper(pixels), size).to(x.dtype)
        return self.clf(self._up(self._down(x, r_embed, cond), r_embed, cond))
