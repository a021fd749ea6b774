"""The ControlNet kinds: one registry read by the pipeline, the command line, the HTTP API, the web UI, the trainer
and `stablecascade download`.

Each kind has its name (the one every interface uses), its model config (`models.controlnet.CONTROLNET`), its
control filter (image -> the ControlNet's input, plus a picture of it), the released weights in the
`stabilityai/stable-cascade` repo (None: never released), how the output is sized, the Python packages its filter
needs, and whether `stablecascade train controlnet` can make one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import InputError
from .models.controlnet import CONTROLNET, ControlNetConfig

Filter = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class ControlNetKind:
    name: str
    description: str
    config: ControlNetConfig
    filter: Filter  # (pipe, control (1,3,H,W), seen: control at the backbone's size, **extras) -> (input, picture)
    released_file: Optional[str]  # in the decoder repo; None: no released weights
    upscale: Optional[float] = None  # output = control size x upscale; None: the control's size, at most 1 MP
    default_strength: float = 1.0
    prior_guidance: Optional[float] = None  # Stage C guidance this kind defaults to (None: the usual)
    packages: tuple = ()  # (import name, pip name) pairs the filter needs
    trainable: bool = True

    def missing_packages(self) -> list:
        """pip names of the filter's packages that are not installed."""
        return [pip for module, pip in self.packages if importlib.util.find_spec(module) is None]


def _canny(pipe, control, seen, **_):
    from .controlnet_filters import canny_control

    edges = canny_control(seen)
    return edges, edges.expand(-1, 3, -1, -1)


def _inpaint(pipe, control, seen, *, mask=None, saliency=None, **_):
    from .controlnet_filters import inpaint_control

    control_input = inpaint_control(seen, mask, saliency=saliency)
    return control_input, control_input[:, :3]


def _face(pipe, control, seen, *, face_models=None, **_):
    from .controlnet_filters import FACE_MODEL_FILES, face_identity_control

    if face_models is None:
        raise InputError("the face ControlNet needs face_models=<folder with the insightface buffalo_l files "
                         f"{', '.join(FACE_MODEL_FILES)}>")
    return face_identity_control(seen, face_models), seen


def _sr(pipe, control, seen, **_):
    from .controlnet_filters import sr_upscale_control

    return sr_upscale_control(pipe.effnet, control), control


KINDS = {kind.name: kind for kind in (
    ControlNetKind("canny", "follow the edges of the control image", CONTROLNET["canny"], _canny,
                   "controlnet/canny.safetensors", packages=(("cv2", "opencv-python-headless"),)),
    ControlNetKind("inpaint", "redraw where the mask is white (or outpaint: extend the image)", CONTROLNET["inpaint"],
                   _inpaint, "controlnet/inpainting.safetensors"),
    ControlNetKind("face", "keep the identities of the faces in the control image", CONTROLNET["identity"], _face,
                   None, packages=(("insightface", "insightface"), ("onnxruntime", "onnxruntime")), trainable=False),
    ControlNetKind("sr", "2x super-resolution of the control image", CONTROLNET["sr"], _sr,
                   "controlnet/super_resolution.safetensors", upscale=2.0, prior_guidance=1.0),
)}
RELEASED = [name for name, kind in KINDS.items() if kind.released_file is not None]
TRAINABLE = [name for name, kind in KINDS.items() if kind.trainable]


def get(name: str) -> ControlNetKind:
    """The kind called `name`; a clear error listing the kinds otherwise."""
    if name not in KINDS:
        raise InputError(f"unknown ControlNet kind {name!r}; use one of {', '.join(KINDS)}")
    return KINDS[name]


def summary() -> str:
    """One line naming each kind and what it does (for --help texts and the web UI)."""
    return "; ".join(f"{kind.name}: {kind.description}" for kind in KINDS.values())
