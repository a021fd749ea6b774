"""The Stable Cascade networks; each knows nothing about files or sampling."""

from .controlnet import ControlNet
from .effnet import EfficientNetEncoder, NanoEncoder
from .previewer import Previewer
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC

__all__ = ["ControlNet", "EfficientNetEncoder", "NanoEncoder", "Previewer", "StageA", "StageB", "StageC"]
