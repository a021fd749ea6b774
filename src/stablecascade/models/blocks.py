"""Building blocks shared by Stage C and Stage B, and the U-Net skeleton both are made of.

Module and parameter names mirror the official checkpoints (official `modules/common.py`), so official state dicts
load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import UNetConfig

# oneDNN's fused linear (an internal op that PyTorch's own compiler emits): checked for, as older or unusual builds
# may lack it
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x, weight, bias=None, activation: str = "none"):
    """F.linear (optionally followed by exact GELU) that runs CPU inference on oneDNN.

    PyTorch sends float32 CPU matmuls to MKL's sgemm, which oneDNN beats 2x or more on AVX-512 CPUs (measured on
    AMD EPYC, bench/RESULTS.md) with the same result up to float rounding; oneDNN also applies the GELU in the same
    pass. Training (autograd), other devices and other dtypes (measured only in float32) keep the stock path."""
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if activation == "gelu" else out


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed by `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC tensors."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.beta, x, self.gamma * nx + 1)  # = γ·(x·nx) + β + x in one pass over x


class ResBlock(nn.Module):
    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            Linear(c + c_skip, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), Linear(c * 4, c)
        )
        self.control_scale = 1.0  # the residual stream's scale here (StageC.rescale_for_fp16 changes it)

    def forward(self, x, x_skip=None):
        h = self.norm(self.depthwise(x))
        if x_skip is not None:
            h = torch.cat([h, x_skip], dim=1)
        expand, _, grn, dropout, project = self.channelwise  # the GELU runs fused into the first projection
        h = linear(h.permute(0, 2, 3, 1), expand.weight, expand.bias, "gelu")
        return project(dropout(grn(h))).permute(0, 3, 1, 2) + x


class TimestepBlock(nn.Module):
    """Scale-and-shift by the noise-level embedding; one mapper per extra condition (`sca`, `crp`)."""

    def __init__(self, c: int, c_timestep: int, conds: tuple[str, ...]):
        super().__init__()
        self.mapper = Linear(c_timestep, c * 2)
        self.conds = conds
        for name in conds:
            setattr(self, f"mapper_{name}", Linear(c_timestep, c * 2))

    def forward(self, x, r_embed):
        chunks = r_embed.chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(chunks[0])
        for name, chunk in zip(self.conds, chunks[1:]):
            ab = ab + getattr(self, f"mapper_{name}")(chunk)
        a, b = ab[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class MultiheadAttention(nn.Module):
    """Same parameters as `torch.nn.MultiheadAttention` (fused `in_proj`, rows q;k;v), computed with SDPA.

    The keys/values of the condition tokens come in already projected (`project_kv`): they do not change across
    sampling steps, so a sampler computes them once per run."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c))
        self.out_proj = Linear(c, c)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project_kv(self, kv_tokens):
        """(B, N, c) tokens -> (B, N, 2c): their keys and values side by side."""
        c = kv_tokens.shape[-1]
        return linear(kv_tokens, self.in_proj_weight[c:], self.in_proj_bias[c:])

    def forward(self, tokens, cond_kv, self_attn: bool):
        """`tokens` attend to the projected condition `cond_kv` and, with `self_attn`, to themselves."""
        c = tokens.shape[-1]
        if self_attn:  # one projection for the image tokens' q, k and v
            q, kv = linear(tokens, self.in_proj_weight, self.in_proj_bias).split([c, 2 * c], dim=-1)
            kv = torch.cat([kv, cond_kv], dim=1)
        else:
            q, kv = linear(tokens, self.in_proj_weight[:c], self.in_proj_bias[:c]), cond_kv
        k, v = kv.chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.nhead, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Attention2D(nn.Module):
    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MultiheadAttention(c, nhead, dropout)

    def forward(self, x, cond_kv, self_attn: bool):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return self.attn(tokens, cond_kv, self_attn).transpose(1, 2).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), Linear(c_cond, c))

    def condition_kv(self, cond):
        """The condition tokens' keys and values for this block (constant over a sampling run)."""
        return self.attention.attn.project_kv(self.kv_mapper(cond))

    def forward(self, x, cond=None, cond_kv=None):
        """Give either the condition tokens `cond` or their precomputed `condition_kv(cond)`."""
        if cond_kv is None:
            cond_kv = self.condition_kv(cond)
        return x + self.attention(self.norm(x), cond_kv, self.self_attn)


def timestep_embedding(r: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise condition r in [0, 1] (sin block first)."""
    half = dim // 2
    freqs = torch.arange(half, device=r.device, dtype=torch.float32).mul(-math.log(max_positions) / (half - 1)).exp()
    args = (r.float() * max_positions)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class CascadeUNet(nn.Module):
    """The level structure Stage C and Stage B share; subclasses add the stem, the mappers and the scalers.

    Down level i runs `blocks[0][i]` units of `level_config[i]` (e.g. "CTA" = ResBlock, TimestepBlock, AttnBlock);
    up levels run deepest first, each `block_repeat[1]` times with a 1x1 conv between passes, and the first
    ResBlock of every up level but the deepest takes the matching down output as a skip in every pass.
    """

    config: UNetConfig

    def _build_levels(self, cfg: UNetConfig, downscaler, upscaler):
        levels = range(len(cfg.c_hidden))

        def block(kind, i, c_skip=0):
            c = cfg.c_hidden[i]
            if kind == "C":
                return ResBlock(c, c_skip, cfg.kernel_size, cfg.dropout[i])
            if kind == "T":
                return TimestepBlock(c, cfg.c_r, cfg.t_conds)
            if kind == "A":
                return AttnBlock(c, cfg.c_cond, cfg.nhead[i], cfg.self_attn, cfg.dropout[i])
            raise ValueError(f"unknown block type {kind!r} in level_config")

        def repeat_mappers(n, c):
            return nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(n - 1))

        self.down_blocks = nn.ModuleList(
            nn.ModuleList(block(k, i) for _ in range(cfg.blocks[0][i]) for k in cfg.level_config[i]) for i in levels
        )
        self.down_downscalers = nn.ModuleList(downscaler(i) if i > 0 else nn.Identity() for i in levels)
        self.down_repeat_mappers = nn.ModuleList(repeat_mappers(cfg.block_repeat[0][i], cfg.c_hidden[i]) for i in levels)
        deepest = len(cfg.c_hidden) - 1
        self.up_blocks = nn.ModuleList(
            nn.ModuleList(
                block(k, i, cfg.c_hidden[i] if i < deepest and j == 0 and n == 0 else 0)
                for j in range(cfg.blocks[1][::-1][i])
                for n, k in enumerate(cfg.level_config[i])
            )
            for i in reversed(levels)
        )
        self.up_upscalers = nn.ModuleList(upscaler(i) if i > 0 else nn.Identity() for i in reversed(levels))
        self.up_repeat_mappers = nn.ModuleList(
            repeat_mappers(cfg.block_repeat[1][::-1][i], cfg.c_hidden[i]) for i in reversed(levels)
        )
        for slot, block in enumerate(m for m in self.modules() if isinstance(m, AttnBlock)):
            block.kv_slot = slot  # its entry in `condition_kv`'s list

    condition_inputs: tuple[str, ...]  # the forward arguments `condition` turns into condition tokens

    def condition_kv(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """Every AttnBlock's keys/values of the condition tokens, indexed by the block's `kv_slot`."""
        return [m.condition_kv(cond) for m in self.modules() if isinstance(m, AttnBlock)]

    def precompute(self, inputs: dict) -> dict:
        """Forward keyword arguments with the condition inputs replaced by `cond_kv`: the same outputs, but the
        condition's mapping and key/value projections run once (per sampling run) instead of at every step."""
        cond = self.condition(**{k: inputs[k] for k in self.condition_inputs})
        return {**{k: v for k, v in inputs.items() if k not in self.condition_inputs}, "cond_kv": self.condition_kv(cond)}

    def embed_r(self, r: torch.Tensor, **conds) -> torch.Tensor:
        """Noise-level embedding plus one embedding per `t_conds` entry (zeros when not given)."""
        parts = [timestep_embedding(r, self.config.c_r)]
        for name in self.config.t_conds:
            value = conds.get(name)
            parts.append(timestep_embedding(torch.zeros_like(r) if value is None else value, self.config.c_r))
        return torch.cat(parts, dim=1).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding[1].weight.dtype

    @staticmethod
    def _run(block, x, r_embed, cond, skip=None):
        """`cond`: the condition tokens, or `condition_kv`'s list of every block's precomputed keys/values."""
        if isinstance(block, ResBlock):
            return block(x, skip)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        if isinstance(cond, torch.Tensor):  # the block projects them itself: inside its own FSDP unit in training
            return block(x, cond=cond)
        return block(x, cond_kv=cond[block.kv_slot])

    @staticmethod
    def _add_control(x, block, controls):
        """Before each ResBlock call, add the next ControlNet entry (if not None), resized to x's size.

        `controls` is an iterator over the ControlNet's list (one entry per ResBlock call in execution order:
        down levels first, then up levels deepest first) or None for no control."""
        if controls is None or not isinstance(block, ResBlock):
            return x
        control = next(controls, None)
        if control is None:
            return x
        control = F.interpolate(control.float(), x.shape[-2:], mode="bilinear", align_corners=True)
        return (x.float() + control * block.control_scale).to(x.dtype)

    def _down(self, x, r_embed, cond, controls=None) -> list[torch.Tensor]:
        outputs = []
        for blocks, downscaler, repmaps in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for j in range(len(repmaps) + 1):
                for block in blocks:
                    x = self._add_control(x, block, controls)
                    x = self._run(block, x, r_embed, cond)
                if j < len(repmaps):
                    x = repmaps[j](x)
            outputs.insert(0, x)
        return outputs

    def _up(self, outputs, r_embed, cond, controls=None) -> torch.Tensor:
        x = outputs[0]
        for i, (blocks, upscaler, repmaps) in enumerate(zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)):
            for j in range(len(repmaps) + 1):
                for n, block in enumerate(blocks):
                    skip = outputs[i] if i > 0 and n == 0 else None
                    if skip is not None and x.shape[-2:] != skip.shape[-2:]:  # odd sizes: stride-2 convs floor
                        x = F.interpolate(x.float(), skip.shape[-2:], mode="bilinear", align_corners=True).to(x.dtype)
                    x = self._add_control(x, block, controls)
                    x = self._run(block, x, r_embed, cond, skip)
                if j < len(repmaps):
                    x = repmaps[j](x)
            x = upscaler(x)
        return x
