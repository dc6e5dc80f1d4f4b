"""Errors of the feedback store and the exporter, each with a message written for a person.

Bad requests (an unknown task, an empty correction, an expired output id...) subclass
:class:`~mmdemo.errors.InvalidInputError`, so the UI and the CLI treat them like any other bad input
(the CLI exits with status 2). Failures of the store itself subclass :class:`StoreError`.
"""

from __future__ import annotations

from ..errors import InvalidFeedbackError, InvalidInputError, MMDemoError, UnknownTaskError

__all__ = [
    "ExpiredOutputError",
    "InvalidFeedbackError",
    "InvalidMediaRefError",
    "NothingToExportError",
    "PermissionDeniedError",
    "RecordNotFoundError",
    "StoreError",
    "UnknownOutputError",
    "UnknownTaskError",
    "UnusableStoreError",
]


class UnknownOutputError(InvalidInputError):
    """No model output has this id (mistyped, never recorded, or deleted)."""


class ExpiredOutputError(UnknownOutputError):
    """The output is older than the store keeps outputs open for feedback."""


class InvalidMediaRefError(InvalidInputError):
    """A media reference that is not a content hash of the expected form (it could name any path)."""


class NothingToExportError(InvalidInputError):
    """No feedback record matches the export's task and filters."""


class RecordNotFoundError(MMDemoError):
    """No feedback record (or output) has this id."""


class PermissionDeniedError(MMDemoError):
    """The action needs a role the caller does not have (deleting records is for admins)."""


class StoreError(MMDemoError):
    """The store could not do its job (database unreachable, disk full, schema newer than this app)."""


class UnusableStoreError(StoreError):
    """The database or media folder is there but is no usable store (an empty or damaged file, another
    application's database, media folder missing): opening it anyway would lose records, so the store
    refuses to open and the app to start. The message names the file and how to recover."""


# --- annotation campaigns (mmdemo.feedback.annotation) ---------------------------------------------


class InvalidCampaignError(InvalidInputError):
    """A campaign that cannot be created as asked: bad name, task, labels per item or lease time, or a
    name already taken."""


class UnknownCampaignError(InvalidInputError):
    """No annotation campaign has this name (or id)."""


class NotInCampaignError(InvalidInputError):
    """The output is not one of the campaign's items, or is of another task."""


class NotLeasedError(InvalidInputError):
    """The item is not in the annotator's batch: never given to them, skipped, or given to someone else
    after their lease expired."""


__all__ += ["InvalidCampaignError", "NotInCampaignError", "NotLeasedError", "UnknownCampaignError"]


# --- promoted default models (mmdemo.feedback.promotions) ----------------------------------------------


class PromotionError(InvalidInputError):
    """A promotion or rollback that cannot be done as asked: the model is already the task's default, or
    the task has no promotion left to roll back."""


__all__ += ["PromotionError"]
