"""Conversions between tensors and PIL images, and PNG files that carry their generation parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "stablecascade"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) floats in [0, 1] -> PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def save_png(image: Image.Image, path: Union[str, Path], parameters: dict) -> Path:
    """Save with the parameters as JSON in a PNG text chunk (also under "parameters", which other UIs read)."""
    info = PngImagePlugin.PngInfo()
    text = json.dumps(parameters, sort_keys=True)
    info.add_text(PARAMETERS_KEY, text)
    info.add_text("parameters", text)
    path = Path(path)
    image.save(path, pnginfo=info)
    return path


def read_parameters(path: Union[str, Path]) -> dict:
    """The generation parameters stored in a PNG written by `save_png`."""
    with Image.open(path) as im:
        return json.loads(im.text[PARAMETERS_KEY])
