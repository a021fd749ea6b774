"""Conversions between tensors and PIL images, and PNG files that carry their generation parameters."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from .errors import InputError, LimitError
from .limits import current

PARAMETERS_KEY = "stablecascade"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) floats in [0, 1] -> PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def infotext(parameters: dict) -> str:
    """AUTOMATIC1111's "infotext" of the parameters: the prompt, a "Negative prompt:" line and one line of
    "Key: value" pairs, which A1111's PNG Info, image browsers and sd-parsers read from the `parameters` chunk.
    Stable Cascade's two stages map onto it as: Steps / CFG scale = Stage C (the prior), "Decoder steps" /
    "Decoder CFG" = Stage B ("Decoder sampler" when Stage B's differs); Sampler is the sampler's A1111 name
    ("Euler a"); Model is the prior's name."""
    from .sampling import SAMPLERS

    sampler, decoder_sampler = parameters.get("sampling"), parameters.get("decoder_sampling")
    fields = {
        "Steps": parameters.get("prior_steps"),
        "Sampler": SAMPLERS[sampler].label if sampler in SAMPLERS else sampler,
        "CFG scale": parameters.get("prior_guidance"),
        "Seed": parameters.get("seed"),
        "Size": f"{parameters['width']}x{parameters['height']}" if "width" in parameters else None,
        "Model": parameters.get("prior"),
        "Denoising strength": parameters.get("strength"),
        "Decoder steps": parameters.get("decoder_steps"),
        "Decoder CFG": parameters.get("decoder_guidance"),
        "Decoder sampler": SAMPLERS[decoder_sampler].label if decoder_sampler in SAMPLERS else decoder_sampler,
        "Compression": parameters.get("compression"),
        "ControlNet": parameters.get("controlnet"),
        "Control strength": parameters.get("control_strength"),
        "Mode": parameters.get("mode"),
    }
    line = ", ".join(f"{key}: {_infotext_value(value)}" for key, value in fields.items() if value is not None)
    lines = [str(parameters.get("prompt", ""))]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    return "\n".join(lines + [line])


def _infotext_value(value) -> str:
    """A value as A1111 writes it: quoted as JSON when it holds a separator (a comma, colon or newline)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def text_chunks(parameters: dict) -> dict:
    """The PNG text chunks of an image's parameters: A1111 infotext under "parameters" (what other tools read)
    and the full JSON under "stablecascade" (what `read_parameters` reads)."""
    return {"parameters": infotext(parameters), PARAMETERS_KEY: json.dumps(parameters, sort_keys=True, default=str)}


def png_info(parameters: dict) -> PngImagePlugin.PngInfo:
    """A `PngInfo` for `Image.save(..., pnginfo=...)` carrying `text_chunks(parameters)`."""
    info = PngImagePlugin.PngInfo()
    for key, text in text_chunks(parameters).items():
        info.add_text(key, text)
    return info


def png_bytes(image: Image.Image, parameters: dict) -> bytes:
    """PNG file contents with the parameters in their text chunks (see `text_chunks`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(parameters))
    return buffer.getvalue()


def save_png(image: Image.Image, path: Union[str, Path, BinaryIO], parameters: dict) -> Union[Path, BinaryIO]:
    """Save as PNG with the parameters in its text chunks (see `text_chunks`), to a file path or a binary file
    object."""
    path = path if hasattr(path, "write") else Path(path)
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return path


def save_with_metadata(image: Image.Image, path: Union[str, Path]) -> Path:
    """Save an image returned by the pipeline as PNG with its own parameters (`image.info["parameters"]`)."""
    parameters = image.info.get("parameters")
    if not isinstance(parameters, dict):
        from .errors import InputError

        raise InputError("this image carries no stablecascade parameters (it was not made by the pipeline); "
                         "use save_png(image, path, parameters)")
    return save_png(image, path, parameters)


def read_parameters(path: Union[str, Path]) -> dict:
    """The generation parameters stored in a PNG written by `save_png`."""
    with Image.open(path) as im:
        return json.loads(im.text[PARAMETERS_KEY])


def open_image(source: Union[str, Path, BinaryIO], *, max_pixels: int, name: str,
               formats: Optional[tuple] = None, limit_option: str = "max_pixels") -> Image.Image:
    """Open and decode an image file (a path or a binary file object), upright by its EXIF orientation.

    The pixel count is checked from the header before any pixel is decoded, so a small file declaring a huge
    image (a decompression bomb) raises `LimitError` naming `limit_option`; a text chunk over Pillow's limit
    (PngImagePlugin.MAX_TEXT_CHUNK, 1 MB: a zTXt bomb) and anything unreadable raise `InputError`. `formats`:
    the accepted Pillow format names (default: any Pillow reads)."""
    accepted = "PNG, JPEG or WebP"
    if formats:
        accepted = f"{', '.join(formats[:-1])} or {formats[-1]}" if len(formats) > 1 else formats[0]
    try:
        with warnings.catch_warnings():  # Pillow warns of sizes this function then refuses itself (or accepts)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError:
        raise InputError(f"{name}: image not found") from None
    except Image.DecompressionBombError as e:  # Pillow's own refusal, for sizes far over any sane limit
        raise LimitError(f"{name}: {e}; the limit is {max_pixels} pixels: scale it down, or raise "
                         f"{limit_option}") from None
    except ValueError as e:  # Pillow refuses an oversized text chunk while reading the header
        raise InputError(f"{name}: cannot read the image ({e}); send a {accepted} file without huge "
                         "metadata") from None
    except (OSError, SyntaxError):
        raise InputError(f"{name}: cannot read it as an image: not a {accepted} file, or a corrupt one") from None
    with image:
        if formats and image.format not in formats:
            raise InputError(f"{name}: {image.format} images are not accepted; use {accepted}")
        width, height = image.size
        if width * height > max_pixels:
            raise LimitError(f"{name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}; "
                             f"scale it down, or raise {limit_option}")
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a portrait photo stored sideways comes out upright
        except ValueError as e:  # an oversized text chunk after the pixel data
            raise InputError(f"{name}: cannot read the image ({e}); send a {accepted} file without huge "
                             "metadata") from None
        except (OSError, SyntaxError) as e:
            raise InputError(f"{name}: cannot decode the image ({e}); it may be truncated or corrupt") from None
    return image


def load_image(source: Union[str, Path, Image.Image, torch.Tensor]) -> torch.Tensor:
    """An RGB float tensor (3,H,W) in [0, 1] from a path, a PIL image (any mode) or a tensor.

    Files are read with `open_image` (size checked from the header, EXIF orientation applied); every input is held
    to the current `limits.Limits.max_input_pixels`. Transparency is composited over white, greyscale is repeated
    to RGB, 16-bit and float images are rescaled."""
    limits = current()
    if isinstance(source, torch.Tensor):
        if source.dim() >= 2:
            limits.check_input(source.shape[-1], source.shape[-2])
        t = source.detach().float()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise InputError(f"an image tensor must be (3,H,W) or (1,3,H,W), got {tuple(source.shape)}")
        if t.min() < 0 or t.max() > 1:
            raise InputError("image tensors must hold values in [0, 1]")
        return t.expand(3, -1, -1).contiguous()
    if isinstance(source, (str, Path)):
        image = open_image(source, max_pixels=limits.max_input_pixels, name=str(source),
                           limit_option="--max-input-pixels")
    elif isinstance(source, Image.Image):
        limits.check_input(*source.size)
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
