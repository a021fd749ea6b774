"""Geometry: how output sizes map to Stage C and Stage B latent sizes, and the default sizes of the modes."""

from __future__ import annotations

import math

from .errors import InputError
from .settings import DEFAULTS

COMPRESSION = DEFAULTS.compression  # image pixels per Stage C latent cell (1024 px -> 24 cells); ComfyUI users like ~32
STAGE_A_FACTOR = 4  # image pixels per Stage B latent cell
EFFNET_FACTOR = 32  # EfficientNet input pixels per Stage C latent cell


def latent_sizes(height: int, width: int, compression: float = COMPRESSION) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Stage C latent h, w), (Stage B latent h, w) for an output size, as the official notebooks size them."""
    return ((math.ceil(height / compression), math.ceil(width / compression)),
            (height // STAGE_A_FACTOR, width // STAGE_A_FACTOR))


def check_compression(compression) -> float:
    if not isinstance(compression, (int, float)) or not 8 <= compression <= 128:
        raise InputError(f"compression must be a number between 8 and 128 (default {COMPRESSION}), got {compression!r}")
    return float(compression)


def round8(v: float) -> int:
    """The nearest multiple of 8 (at least 8)."""
    return max(8, int(round(v / 8)) * 8)


def default_size(width: int, height: int, max_area: int = 1024 * 1024) -> tuple[int, int]:
    """An input image's size, scaled down to at most `max_area` pixels, in multiples of 8."""
    scale = min(1.0, math.sqrt(max_area / (width * height)))
    if scale == 1.0:
        return round8(width), round8(height)
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)  # floor keeps the area cap
