"""The EfficientNetV2-S "semantic compressor" that maps images to Stage C latents (`official-spec.md` §1.5)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import efficientnet_v2_s

from ..configs import EffnetConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    def __init__(self, config: EffnetConfig = EffnetConfig()):
        super().__init__()
        self.config = config
        self.backbone = efficientnet_v2_s(weights=None).features  # weights come from the checkpoint
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, config.c_latent, 1, bias=False), nn.BatchNorm2d(config.c_latent, affine=False)
        )

    def forward(self, images):
        """RGB in [0, 1] (B,3,H,W) -> latents (B,16,ceil(H/32),ceil(W/32)); no resizing."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype)[:, None, None]
        return self.mapper(self.backbone((images - mean) / std))
