"""Typed errors raised by every layer of mmdemo.

Each error carries a message written for a person: the UI shows ``str(error)`` as it is, the API
raises the type. Nothing here imports torch, so the UI and storage layers can use it freely.
"""

from __future__ import annotations


class MMDemoError(Exception):
    """Base class of every error mmdemo raises on purpose."""


# --- bad input -----------------------------------------------------------------------------------


class InvalidInputError(MMDemoError, ValueError):
    """The request itself is wrong (empty prompt, bad labels, out-of-range setting).

    ``field`` names the request field (the API parameter) the message concerns, when it concerns one, so
    that the UI shows the message next to that control.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidImageError(InvalidInputError):
    """The image cannot be read: not an image, truncated or corrupt."""


class ImageTooLargeError(InvalidInputError):
    """The image has more pixels (or bytes) than the configured limit."""


class InvalidAudioError(InvalidInputError):
    """The audio cannot be read, is empty, or holds only silence."""


class AudioTooLongError(InvalidInputError):
    """The audio is longer (or larger) than the configured limit."""


# --- models ---------------------------------------------------------------------------------------


class UnknownTaskError(InvalidInputError):
    """The name is not the id or alias of a registered task."""


class InvalidFeedbackError(InvalidInputError):
    """A rating, correction, comment or annotator that the store refuses (wrong shape, empty, too long)."""


class UnknownModelError(MMDemoError, KeyError):
    """The model id is not in the catalog (only catalog models can be loaded)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CatalogError(MMDemoError):
    """A catalog file or entry is malformed."""


class TaskMismatchError(InvalidInputError):
    """A model was asked to run a task it does not serve."""


class ModelLoadError(MMDemoError):
    """A catalog model failed to load (missing files, corrupt weights, no network for the Hub)."""

    def __init__(self, model_id: str, reason: str):
        super().__init__(f"Model '{model_id}' could not be loaded: {reason}")
        self.model_id = model_id
        self.reason = reason


class ModelOutOfMemoryError(MMDemoError):
    """The device ran out of memory even after evicting other models and retrying once."""


class MemoryBudgetError(MMDemoError):
    """The model does not fit in the memory budget, even with every idle model evicted."""


class RequestInterrupted(MMDemoError):
    """The person stopped a running request (Interrupt); the message says at which step."""


class ModelRuntimeError(MMDemoError):
    """A loaded model failed while running (a fault inside the model, not bad input)."""


class NotAllowedError(MMDemoError):
    """The caller's role does not allow what they asked (loading models, exporting feedback, fine-tuning...)."""
