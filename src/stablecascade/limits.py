"""Limits on what one call may ask for, checked before anything is allocated.

One `Limits` object bounds the pixels of each output image, the pixels of each input image (checked from the
file header, before decoding), the images per call and the sampling steps. The pipeline and image loading check
the current limits (`current()`); the command line sets them from --max-pixels, --max-input-pixels, --max-images
and --max-steps, Python code with `set_current(Limits(...))`. Every refusal is a `LimitError` naming the option
that raises the limit."""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from .errors import InputError, LimitError

SEED_RANGE = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64
OPTIONS = {  # field -> the command-line option that raises it
    "max_pixels": "--max-pixels",
    "max_input_pixels": "--max-input-pixels",
    "max_images": "--max-images",
    "max_steps": "--max-steps",
}


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 2048  # per output image: twice the released models' 1024 px side
    max_input_pixels: int = 8192 * 8192  # per input image: a 64 MP photo (a 768 MB float tensor)
    max_images: int = 16  # per call (prompts x images per prompt), generated as one batch
    max_steps: int = 500  # per stage

    def __post_init__(self):
        for name in OPTIONS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{OPTIONS[name]} must be a whole number >= 1, got {value!r}")

    def _refuse(self, problem: str, field: str, fix: str) -> LimitError:
        return LimitError(f"{problem}, over the limit of {getattr(self, field)}; {fix}, or raise the limit with "
                          f"{OPTIONS[field]} (Python: stablecascade.limits.set_current(Limits({field}=...)))")

    def check_output(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise self._refuse(f"{width}x{height} is {width * height} pixels per image", "max_pixels",
                               "ask for a smaller --width/--height")

    def check_input(self, width: int, height: int, name: str = "input image") -> None:
        if width * height > self.max_input_pixels:
            raise self._refuse(f"{name}: {width}x{height} is {width * height} pixels", "max_input_pixels",
                               "scale it down")

    def check_generation(self, *, width: int, height: int, images: int, steps: Mapping[str, int],
                         seed: Union[int, Sequence[int], None] = None) -> None:
        """Everything one generation call asks for: output size, image count, steps per stage and the seed(s)
        (image i of an int seed uses seed + i). The arguments' types are the caller's to have checked."""
        self.check_output(width, height)
        if images > self.max_images:
            raise self._refuse(f"{images} images in one call", "max_images", "ask for fewer (--num-images)")
        for name, value in steps.items():
            if value > self.max_steps:
                raise self._refuse(f"{name}={value}", "max_steps", "use fewer steps")
        check_seed(seed, images)


def check_seed(seed: Union[int, Sequence[int], None], images: int = 1) -> None:
    """A seed is a whole number with seed + images - 1 < 2**64 (or a list of such numbers, or None: random)."""
    if seed is None:
        return
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    top = images - 1 if not isinstance(seed, (list, tuple)) else 0
    for s in seeds:
        if not isinstance(s, numbers.Integral) or isinstance(s, bool):
            raise InputError(f"seed must be a whole number, got {s!r}")
        if not 0 <= s < SEED_RANGE - top:
            raise InputError(f"seed {s} is out of range: use 0 to {SEED_RANGE - 1 - top} (omit it for a random "
                             "seed)")


_current = Limits()


def current() -> Limits:
    """The limits in effect for this process."""
    return _current


def set_current(limits: Limits) -> None:
    global _current
    if not isinstance(limits, Limits):
        raise InputError(f"expected a stablecascade.limits.Limits, got {type(limits).__name__}")
    _current = limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    default = Limits()
    g = p.add_argument_group("limits (a request over one is refused before any work)")
    g.add_argument("--max-pixels", dest="limit_max_pixels", type=int, default=default.max_pixels,
                   help=f"largest output image in pixels (default {default.max_pixels}: 2048x2048)")
    g.add_argument("--max-input-pixels", dest="limit_max_input_pixels", type=int, default=default.max_input_pixels,
                   help=f"largest input image in pixels, read from its header (default {default.max_input_pixels})")
    g.add_argument("--max-images", dest="limit_max_images", type=int, default=default.max_images,
                   help=f"most images per call (default {default.max_images})")
    g.add_argument("--max-steps", dest="limit_max_steps", type=int, default=default.max_steps,
                   help=f"most sampling steps per stage (default {default.max_steps})")


def from_args(args: argparse.Namespace) -> Optional[Limits]:
    """The limits a command line set with `add_arguments`'s options (None when it has none of them)."""
    if not hasattr(args, "limit_max_pixels"):
        return None
    return Limits(**{f.name: getattr(args, f"limit_{f.name}") for f in dataclasses.fields(Limits)})
