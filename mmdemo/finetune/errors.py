"""Typed errors of fine-tuning jobs (messages written for a person, as everywhere in mmdemo)."""

from __future__ import annotations

from ..errors import InvalidInputError, MMDemoError


class FinetuneError(MMDemoError):
    """A fine-tuning job failed for a reason that is not bad input."""


class InvalidModelNameError(InvalidInputError):
    """The name for the new model is not a safe, unused model id."""


class UnsupportedBaseError(InvalidInputError):
    """The base model cannot be fine-tuned for the task (wrong task or kind, no adapter)."""


class InvalidDatasetError(InvalidInputError):
    """The training dataset is missing, of another task, or lacks the columns the task needs."""


class FinetuneCancelled(FinetuneError):
    """The job was cancelled; nothing was published."""
