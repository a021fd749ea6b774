"""The Previewer: a small conv decoder from Stage C latents to an 8x larger RGB preview (official `modules/previewer.py`)."""

from __future__ import annotations

from torch import nn

from ..configs import PreviewerConfig


class Previewer(nn.Module):
    def __init__(self, config: PreviewerConfig = PreviewerConfig()):
        super().__init__()
        self.config = config
        c, half, quarter = config.c_hidden, config.c_hidden // 2, config.c_hidden // 4

        def unit(layer, c_out):  # conv -> GELU -> BatchNorm, the official order
            return [layer, nn.GELU(), nn.BatchNorm2d(c_out)]

        self.blocks = nn.Sequential(
            *unit(nn.Conv2d(config.c_in, c, 1), c),
            *unit(nn.Conv2d(c, c, 3, padding=1), c),
            *unit(nn.ConvTranspose2d(c, half, 2, stride=2), half),
            *unit(nn.Conv2d(half, half, 3, padding=1), half),
            *unit(nn.ConvTranspose2d(half, quarter, 2, stride=2), quarter),
            *unit(nn.Conv2d(quarter, quarter, 3, padding=1), quarter),
            *unit(nn.ConvTranspose2d(quarter, quarter, 2, stride=2), quarter),
            *unit(nn.Conv2d(quarter, quarter, 3, padding=1), quarter),
            nn.Conv2d(quarter, config.c_out, 1),
        )

    def forward(self, latents):
        """Stage C latents (B,16,h,w) -> RGB preview (B,3,8h,8w), roughly in [0, 1]."""
        return self.blocks(latents)
