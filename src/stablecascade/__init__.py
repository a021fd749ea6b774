"""stablecascade: Stable Cascade (Würstchen v3) text-to-image, in one library and CLI."""

from .errors import CheckpointError, InputError, StableCascadeError
from .images import save_with_metadata
from .loading import load_pipeline
from .pipeline import StableCascadePipeline

__version__ = "0.1.0"
__all__ = ["load_pipeline", "StableCascadePipeline", "StableCascadeError", "CheckpointError", "InputError",
           "save_with_metadata"]
