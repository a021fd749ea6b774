"""The inference defaults, in one place: the Python API, the CLI, the HTTP API and the web UI all read `DEFAULTS`.

Values that belong to a model (its native size, its schedule shifts, its Stage B guidance, its prediction target)
are not here: they come with the model (`model.json` of a bundle, a checkpoint's metadata) and `None` below means
"the model's own"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class InferenceSettings:
    prior_steps: int = 20  # Stage C
    prior_guidance: float = 4.0
    decoder_steps: int = 10  # Stage B
    decoder_guidance: Optional[float] = None  # None: the model's for GDF samplers (1.1 released), 0 for "diffusers"
    sampler: str = "official"  # a name of `sampling.SAMPLERS`
    width: Optional[int] = None  # None: the model's native size (1024 for the released models)
    height: Optional[int] = None
    num_images: int = 1  # per prompt
    compression: float = 42.67  # image pixels per Stage C latent cell (1024 px -> 24 cells)

    def decoder_guidance_for(self, sampler, model_guidance: float) -> float:
        """The Stage B guidance of a call that gives none, for `sampler` (a `sampling.Sampler`) on a model whose own
        is `model_guidance`: `decoder_guidance` when set, else the model's with the samplers that run at the
        model's shifts, and 0 with the unshifted "diffusers" one (as diffusers' pipeline)."""
        if self.decoder_guidance is not None:
            return self.decoder_guidance
        return model_guidance if sampler.model_shifts else 0.0


DEFAULTS = InferenceSettings()

# What the released models were made for; a bundle or a trainer-written checkpoint may record other values.
RELEASED_SHIFTS = (2.0, 1.0)  # (Stage C, Stage B) schedule shifts of the official sampler
RELEASED_DECODER_GUIDANCE = 1.1  # Stage B guidance of the official notebooks (with cfg rho 0.7)
