"""Conversions between tensors and PIL images, and PNG files that carry their generation parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "stablecascade"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) floats in [0, 1] -> PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def save_png(image: Image.Image, path: Union[str, Path, BinaryIO], parameters: dict) -> Union[Path, BinaryIO]:
    """Save with the parameters as JSON in a PNG text chunk (also under "parameters", which other UIs read), to a
    file path or a binary file object."""
    info = PngImagePlugin.PngInfo()
    text = json.dumps(parameters, sort_keys=True)
    info.add_text(PARAMETERS_KEY, text)
    info.add_text("parameters", text)
    path = path if hasattr(path, "write") else Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_parameters(path: Union[str, Path]) -> dict:
    """The generation parameters stored in a PNG written by `save_png`."""
    with Image.open(path) as im:
        return json.loads(im.text[PARAMETERS_KEY])


def load_image(source: Union[str, Path, Image.Image, torch.Tensor]) -> torch.Tensor:
    """An RGB float tensor (3,H,W) in [0, 1] from a path, a PIL image (any mode) or a tensor.

    Transparency is composited over white, greyscale is repeated to RGB, 16-bit and float images are rescaled."""
    from .errors import InputError

    if isinstance(source, torch.Tensor):
        t = source.detach().float()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise InputError(f"an image tensor must be (3,H,W) or (1,3,H,W), got {tuple(source.shape)}")
        if t.min() < 0 or t.max() > 1:
            raise InputError("image tensors must hold values in [0, 1]")
        return t.expand(3, -1, -1).contiguous()
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                im.load()
                image = im
        except FileNotFoundError:
            raise InputError(f"image not found: {source}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"cannot read {source} as an image ({e}); use PNG, JPEG or WebP") from None
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise InputError(f"expected an image path, a PIL image or a tensor, got {type(source).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float32)
        a = a / 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else a / (255.0 if a.max() > 1 else 1.0)
        return torch.from_numpy(np.clip(a, 0, 1))[None].expand(3, -1, -1).contiguous()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of (B,3,H,W) images."""
    import torch.nn.functional as F

    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, (height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image tensors in [0, 1]."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
