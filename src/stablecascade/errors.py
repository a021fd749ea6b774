"""Errors raised for problems a user can fix; each message names the problem and the fix."""


class StableCascadeError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(StableCascadeError):
    """A checkpoint is missing, unreadable, of the wrong kind or does not fit the model."""


class InputError(StableCascadeError, ValueError):
    """An argument (size, step count, image, prompt...) is out of range or of the wrong type."""


class UnsupportedError(CheckpointError):
    """The loaded model cannot run this (e.g. image variation without a fitting CLIP image encoder); HTTP 501."""


class LimitError(InputError):
    """A request is over a configured limit (image size, images per call, steps); the message names the option
    that raises it."""
