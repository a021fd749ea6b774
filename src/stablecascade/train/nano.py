"""The nano model's pieces that are not part of the released architecture.

`NanoEncoder` stands in for the EfficientNetV2-S "semantic compressor" when training tiny cascades: a small,
frozen, seeded conv net mapping RGB in [0, 1] (B,3,H,W) to 16-channel latents at H/32 (like the EfficientNet),
normalised per position. It only defines the Stage C latent space for training; text-to-image never runs it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models.blocks import LayerNorm2d


class NanoEncoder(nn.Module):
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


def load_nano_encoder(path: Optional[str] = None, seed: int = 0) -> NanoEncoder:
    """The shipped weights (safetensors) at `path`, or a freshly seeded encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NanoEncoder()
    if path:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)
