"""Image -> Stage C latent encoders: the EfficientNetV2-S "semantic compressor" of the released models
(official `modules/effnet.py`) and the nano model's small stand-in for it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.models import efficientnet_v2_s

from ..configs import EffnetConfig
from .blocks import LayerNorm2d

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


class NanoEncoder(nn.Module):
    """The nano model's EfficientNet stand-in: a small conv net from RGB in [0, 1] (B,3,H,W) to 16-channel latents
    at ceil(H/32) x ceil(W/32), normalised per position. It defines the nano Stage C latent space; 64x64 shapes need
    no ImageNet features, so it is trained as an autoencoder with the Previewer (scripts/train_nano.py), or left
    seeded and random for tests."""

    def __init__(self, c_latent: int = 16, width: int = 48):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4), nn.GELU(),
            nn.Conv2d(width, width, 2, stride=2), nn.GELU(),
            nn.Conv2d(width, width, 2, stride=2), nn.GELU(),
            nn.Conv2d(width, c_latent, 2, stride=2),
            LayerNorm2d(c_latent, elementwise_affine=False, eps=1e-6),
        )

    def forward(self, images):
        h, w = images.shape[-2:]
        pad_h, pad_w = -h % 32, -w % 32  # ceil(H/32) cells, as the EfficientNet's padded convs give
        if pad_h or pad_w:
            images = nn.functional.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        return self.net(images * 2 - 1)


def load_nano_encoder(path: Optional[str] = None, seed: int = 0, device=None) -> NanoEncoder:
    """The saved weights (safetensors) at `path`, or a freshly seeded encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NanoEncoder()
    if path:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)
