"""Stage A: the f4 VQGAN between pixels and Stage B's 4-channel latent space (official `modules/stage_a.py`)."""

from __future__ import annotations

import torch
from torch import nn

from ..configs import StageAConfig
from .blocks import Linear, linear


class ResBlock(nn.Module):
    """Stage A's gated residual block: six learned scalars modulate the norms and both branches."""

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, 3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(Linear(c, c_hidden), nn.GELU(), Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        expand, _, project = self.channelwise  # the GELU runs fused into the first projection
        return x + project(linear(h, expand.weight, expand.bias, "gelu")).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    def __init__(self, c: int, k: int):
        super().__init__()
        self.codebook = nn.Embedding(k, c)

    def forward(self, z):
        """Nearest codebook entry per pixel; returns (quantized NCHW, indices)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat.float(), self.codebook.weight.float()).argmin(dim=1)
        q = self.codebook(idx).reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return q.to(z.dtype), idx.reshape(z.shape[0], z.shape[2], z.shape[3])


class StageA(nn.Module):
    def __init__(self, config: StageAConfig):
        super().__init__()
        self.config = cfg = config
        c = [cfg.c_hidden // 2**i for i in reversed(range(cfg.levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c[0], 1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c[i - 1], c[i], 4, stride=2, padding=1))
            down.append(ResBlock(c[i], c[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(c[-1], cfg.c_latent, 1, bias=False), nn.BatchNorm2d(cfg.c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.c_latent, cfg.codebook_size)
        up = [nn.Sequential(nn.Conv2d(cfg.c_latent, c[-1], 1))]
        for i in range(cfg.levels):
            level = c[cfg.levels - 1 - i]
            up.extend(ResBlock(level, level * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(level, c[cfg.levels - 2 - i], 4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c[0], 3 * 4, 1), nn.PixelShuffle(2))

    def encode(self, images, quantize: bool = False):
        """RGB in [0, 1] (B,3,H,W) -> Stage B latents (B,4,H/4,W/4), divided by the scale factor.
        Stage B was trained on the unquantized latents; `quantize=True` snaps them to the codebook."""
        z = self.down_blocks(self.in_block(images))
        if quantize:
            z = self.vquantizer(z)[0]
        return z / self.config.scale_factor

    def decode(self, latents):
        """Stage B latents -> RGB (unclamped, nominally [0, 1]); no quantization, as in the official code."""
        return self.out_block(self.up_blocks(latents * self.config.scale_factor))

    @property
    def pixels_per_latent(self) -> int:
        return 2 ** self.config.levels

    def decode_tiled(self, latents, tile: int = 256, overlap: int = 64):
        """decode() in overlapping tiles of `tile` latent cells: memory stays that of one tile whatever the image
        size. Within an overlap each tile's weight is 0 over the quarter next to its edge (where its border padding
        reaches: the released decoder sees ~14 latent cells around a pixel) and then ramps up linearly, so the
        blend uses only pixels decoded with their full surroundings."""
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
        f = self.pixels_per_latent
        (b, _, h, w), dev = latents.shape, latents.device
        out = torch.zeros(b, 3, h * f, w * f, device=dev, dtype=torch.float32)
        total = torch.zeros(1, 1, h * f, w * f, device=dev, dtype=torch.float32)
        for y in _tile_starts(h, tile, overlap):
            for x in _tile_starts(w, tile, overlap):
                th, tw = min(tile, h - y), min(tile, w - x)
                image = self.decode(latents[..., y:y + th, x:x + tw]).float()
                weight = (_ramp(th * f, overlap * f, y > 0, y + th < h, dev)[:, None]
                          * _ramp(tw * f, overlap * f, x > 0, x + tw < w, dev)[None, :])
                out[..., y * f:(y + th) * f, x * f:(x + tw) * f] += image * weight
                total[..., y * f:(y + th) * f, x * f:(x + tw) * f] += weight
        return (out / total).to(latents.dtype)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def _ramp(n: int, length: int, rise: bool, fall: bool, device) -> torch.Tensor:
    """Blend weights along one tile side of n pixels: at a side shared with a neighbour, 0 over the first quarter
    of the `length`-pixel overlap, then rising linearly to 1 at its three quarters; flat 1 elsewhere."""
    weight = torch.ones(n, device=device)
    margin = length // 4
    ramp = ((torch.arange(min(length, n), device=device) + 0.5 - margin) / max(length - 2 * margin, 1)).clamp(0, 1)
    if rise:
        weight[: len(ramp)] = torch.minimum(weight[: len(ramp)], ramp)
    if fall:
        weight[n - len(ramp):] = torch.minimum(weight[n - len(ramp):], ramp.flip(0))
    return weight
