"""What a loaded pipeline can run, and why not: read by the command line, the HTTP API (501 with the reason, /health)
and the web UI (disabled tabs, size ranges, examples), and checked before anything is fetched from the Hub."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import controlnets
from .models.controlnet import RELEASED_BLOCKS

RELEASED_LATENT_CHANNELS = 16  # Stage C latents the released EfficientNet encoder and Previewer work with
RELEASED_PRIOR_WIDTH = 2048  # c_hidden of the 3.6B Stage C, the one the released ControlNets were trained on
RELEASED_EXAMPLES = (
    "cinematic photo of an anthropomorphic penguin reading a book in a cafe",
    "a watercolor fox in the snow",
    "an oil painting of a harbour at dawn, warm light",
    "a lighthouse on a cliff, long exposure photo, stormy sea",
)
MODES = ("txt2img", "img2img", "variation", "controlnet", "reconstruct")


@dataclass
class Capabilities:
    """`modes` and `controlnets` map each name to None (it runs) or the reason it cannot. Sizes in pixels: any
    multiple of `size_step` from `min_size`; `max_size` is the largest side worth asking for (twice the native)."""

    native_size: int
    min_size: int
    max_size: int
    size_step: int
    modes: dict
    controlnets: dict
    previews: Optional[str]
    examples: list = field(default_factory=list)

    def reason(self, mode: str) -> Optional[str]:
        return self.modes.get(mode)

    def controlnet_reason(self, kind: str) -> Optional[str]:
        return self.controlnets[controlnets.get(kind).name]

    def to_dict(self) -> dict:
        def entry(reason):
            return {"available": reason is None, "reason": reason}

        return {"sizes": {"native": self.native_size, "min": self.min_size, "max": self.max_size,
                          "step": self.size_step},
                "modes": {m: entry(r) for m, r in self.modes.items()},
                "controlnets": {k: entry(r) for k, r in self.controlnets.items()},
                "previews": entry(self.previews), "examples": list(self.examples)}


def of(pipe) -> Capabilities:
    """The capabilities of a `StableCascadePipeline` as loaded now (given parts, loaded ControlNets)."""
    c = pipe.stage_c.config
    released_latents = c.c_out == RELEASED_LATENT_CHANNELS
    encoder = None if pipe._effnet is not None or released_latents else (
        f"needs an image encoder for this Stage C's {c.c_out}-channel latents (--effnet): the released EfficientNet "
        f"makes {RELEASED_LATENT_CHANNELS}")
    previews = None if pipe._previewer is not None or released_latents else (
        f"needs a Previewer for this Stage C's {c.c_out}-channel latents (--previewer)")
    from .loading import RELEASED_CLIP_IMG

    variation = None if pipe._image_encoder is not None or c.c_clip_img == RELEASED_CLIP_IMG else (
        f"needs a CLIP image encoder with {c.c_clip_img}-wide embeddings for this Stage C, and none came with the "
        "model (the released one fits only the released Stage C; the nano model has none)")
    kinds = {name: _controlnet_reason(pipe, kind, encoder) for name, kind in controlnets.KINDS.items()}
    usable = [name for name, reason in kinds.items() if reason is None]
    modes = {"txt2img": None, "img2img": encoder, "variation": variation, "reconstruct": encoder,
             "controlnet": None if usable else "none of the ControlNets can run: " + "; ".join(
                 f"{name}: {reason}" for name, reason in kinds.items())}
    step = 8
    min_size = -(-int(pipe.min_size) // step) * step
    return Capabilities(native_size=pipe.native_size, min_size=min_size, max_size=max(min_size, 2 * pipe.native_size),
                        size_step=step, modes=modes, controlnets=kinds, previews=previews,
                        examples=list(pipe.prompt_examples or RELEASED_EXAMPLES))


def _controlnet_reason(pipe, kind: controlnets.ControlNetKind, encoder: Optional[str]) -> Optional[str]:
    missing = kind.missing_packages()
    packages = None
    if missing:
        extra = " (or pip install 'stablecascade[canny]')" if kind.name == "canny" else ""
        packages = f"its filter needs {' and '.join(missing)}: pip install {' '.join(missing)}{extra}"
    if kind.name in pipe._controlnets:
        return packages
    if kind.released_file is None:
        return (f"its weights were never released: load your own with pipe.load_controlnet({kind.name!r}, path) "
                "(--controlnet FILE)")
    c = pipe.stage_c
    if c.config.c_hidden[0] != RELEASED_PRIOR_WIDTH or c.resblock_calls <= max(RELEASED_BLOCKS):
        return ("the released ControlNets fit only the 3.6B Stage C; load one trained for this Stage C with "
                f"pipe.load_controlnet({kind.name!r}, path) (--controlnet FILE)")
    if kind.upscale is not None and encoder is not None:
        return f"super-resolution encodes the control image: {encoder}"
    return packages
