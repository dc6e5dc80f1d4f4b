"""Feedback: record what the models produced, keep what people say about it, export it as datasets.

* :class:`FeedbackStore` (``store.py``): outputs, feedback records and their media, over SQLite
  (default, in the data directory) or PostgreSQL (``MMDEMO_DATABASE_URL``).
* :func:`export_dataset` (``export.py``): feedback of one task as a fine-tuning dataset
  (``datasets``, Parquet or JSON Lines), with a train/validation split and a dataset card.
* ``schemas.py``: ratings, comments, annotators; each task's own schema (inputs, correction, exported
  columns) is part of its descriptor (:mod:`mmdemo.tasks.spec`).
* ``migrations.py``: the named, ordered schema migrations applied at start-up.
* ``promotions.py``: each task's promoted default model and its history (promotions, rollbacks).
"""

from .errors import (
    ExpiredOutputError,
    InvalidFeedbackError,
    InvalidMediaRefError,
    NothingToExportError,
    PermissionDeniedError,
    PromotionError,
    RecordNotFoundError,
    StoreError,
    UnknownOutputError,
    UnknownTaskError,
    UnusableStoreError,
)
from .export import FORMATS, ExportSummary, export_archive, export_dataset
from .records import FeedbackRecord, OutputRecord, SavedFeedback
from .schemas import anonymous_annotator, split_request
from .store import ADMIN_ROLE, ONLY_CHOICES, Deleted, FeedbackStore

__all__ = [
    "ADMIN_ROLE",
    "Deleted",
    "ExpiredOutputError",
    "ExportSummary",
    "FORMATS",
    "FeedbackRecord",
    "FeedbackStore",
    "InvalidFeedbackError",
    "InvalidMediaRefError",
    "NothingToExportError",
    "ONLY_CHOICES",
    "OutputRecord",
    "PermissionDeniedError",
    "PromotionError",
    "RecordNotFoundError",
    "SavedFeedback",
    "StoreError",
    "UnknownOutputError",
    "UnknownTaskError",
    "UnusableStoreError",
    "anonymous_annotator",
    "export_archive",
    "export_dataset",
    "split_request",
]

# Annotation mode: campaigns, batches leased to annotators, progress (see annotation.py).
from .annotation import (  # noqa: E402
    AnnotationItem,
    AnnotationQueue,
    AnnotatorProgress,
    Campaign,
    CampaignProgress,
    ImportSummary,
)
from .errors import InvalidCampaignError, NotInCampaignError, NotLeasedError, UnknownCampaignError  # noqa: E402

__all__ += [
    "AnnotationItem",
    "AnnotationQueue",
    "AnnotatorProgress",
    "Campaign",
    "CampaignProgress",
    "ImportSummary",
    "InvalidCampaignError",
    "NotInCampaignError",
    "NotLeasedError",
    "UnknownCampaignError",
]
