"""Stage C ControlNets (official `modules/controlnet.py`): a backbone that embeds the control image, and one projection per
controlled ResBlock call of Stage C.

The module names mirror the official checkpoints (`canny.safetensors`, `inpainting.safetensors`,
`super_resolution.safetensors`; identity weights were never released), so they load without renaming. The output is
the list `StageC.forward(..., cnet=...)` consumes: `max(proj_blocks) + 1` entries, None except at `proj_blocks`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchvision.models import efficientnet_v2_s

from ..errors import InputError
from .blocks import LayerNorm2d

BOTTLENECK_MODES = ("effnet", "simple", "large")
RELEASED_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # ResBlock calls of the 3.6B Stage C that the released nets control
EFFNET_CHANNELS = 1280  # width of the EfficientNetV2-S features and of the 'large' bottleneck output
LARGE_HIDDEN, LARGE_WIDE, LARGE_BLOCKS = 1024, 16384, 8


@dataclass(frozen=True)
class ControlNetConfig:
    c_in: int = 3  # channels of the control input (the filter's output)
    c_proj: int = 2048  # channels added to Stage C's features (its c_hidden)
    proj_blocks: tuple[int, ...] = RELEASED_BLOCKS  # indices of the ResBlock calls that receive a control
    bottleneck_mode: str = "effnet"

    def __post_init__(self):
        if self.bottleneck_mode not in BOTTLENECK_MODES:
            raise ValueError(f"bottleneck_mode must be one of {BOTTLENECK_MODES}, not {self.bottleneck_mode!r}")
        if not self.proj_blocks or min(self.proj_blocks) < 0 or len(set(self.proj_blocks)) != len(self.proj_blocks):
            raise ValueError(f"proj_blocks must be distinct non-negative indices, got {self.proj_blocks}")
        object.__setattr__(self, "proj_blocks", tuple(int(i) for i in self.proj_blocks))

    @property
    def embedding_channels(self) -> int:
        return self.c_in if self.bottleneck_mode == "simple" else EFFNET_CHANNELS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        return cls(**{**d, "proj_blocks": tuple(d.get("proj_blocks", RELEASED_BLOCKS))})


# The four released kinds; the channel count of each is what its filter produces (see `controlnet_filters`).
CONTROLNET = {
    "canny": ControlNetConfig(c_in=1),
    "inpaint": ControlNetConfig(c_in=4),
    "sr": ControlNetConfig(c_in=16, bottleneck_mode="large"),
    "identity": ControlNetConfig(c_in=512, proj_blocks=tuple(range(64)), bottleneck_mode="simple"),
}


def controlnet_kind(config: ControlNetConfig) -> Optional[str]:
    """Name of the released kind with this config ("canny", "inpaint", "sr", "identity"), else None."""
    return next((name for name, cfg in CONTROLNET.items() if cfg == config), None)


class CNetResBlock(nn.Module):
    """Pre-norm residual block of the 'large' bottleneck: x + [LN, GELU, conv3x3, LN, GELU, conv3x3](x)."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c, eps=1e-5), nn.GELU(), nn.Conv2d(c, c, 3, padding=1),
            LayerNorm2d(c, eps=1e-5), nn.GELU(), nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x):
        return x + self.blocks(x)


def _effnet_backbone(c_in: int) -> nn.Sequential:
    features = efficientnet_v2_s(weights=None).features  # the checkpoint holds every backbone weight
    if c_in != 3:
        # The official code swaps the stem conv for one WITHOUT padding (unlike torchvision's padding=1): the
        # released weights were trained that way, so keep it.
        features[0][0] = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)
    return features


def _build_backbone(cfg: ControlNetConfig) -> nn.Module:
    if cfg.bottleneck_mode == "effnet":
        return _effnet_backbone(cfg.c_in)
    if cfg.bottleneck_mode == "simple":
        c = cfg.c_in
        return nn.Sequential(nn.Conv2d(c, c * 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(c * 4, c, 3, padding=1))
    return nn.Sequential(
        nn.Conv2d(cfg.c_in, LARGE_WIDE, 1), nn.LeakyReLU(0.2), nn.Conv2d(LARGE_WIDE, LARGE_HIDDEN, 1),
        *(CNetResBlock(LARGE_HIDDEN) for _ in range(LARGE_BLOCKS)),
        nn.Conv2d(LARGE_HIDDEN, EFFNET_CHANNELS, 1),
    )


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig = CONTROLNET["canny"]):
        super().__init__()
        self.config = cfg = config
        e = cfg.embedding_channels
        self.backbone = _build_backbone(cfg)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(e, e, 1, bias=False), nn.LeakyReLU(0.2), nn.Conv2d(e, cfg.c_proj, 1, bias=False))
            for _ in cfg.proj_blocks
        )
        for proj in self.projections:  # as trained: a fresh ControlNet starts as "no control"
            nn.init.zeros_(proj[-1].weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.projections[0][0].weight.dtype

    def forward(self, x: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """Control input (B,c_in,H,W) -> list of `max(proj_blocks)+1` entries, (B,c_proj,h,w) at `proj_blocks`."""
        if x.shape[1] != self.config.c_in:
            raise InputError(f"this ControlNet takes {self.config.c_in}-channel control inputs, got {x.shape[1]}")
        features = self.backbone(x.to(self.dtype))
        out: list[Optional[torch.Tensor]] = [None] * (max(self.config.proj_blocks) + 1)
        for index, proj in zip(self.config.proj_blocks, self.projections):
            out[index] = proj(features)
        return out
