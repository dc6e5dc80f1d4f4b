"""The plain values the store hands back: what was saved, and a full feedback record."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class SavedFeedback:
    """The answer to :meth:`FeedbackStore.add_feedback`.

    ``created`` is False when the same annotator had already given feedback on this output: the
    record was updated in place and keeps its id, so a double click never makes two records.
    """

    id: int
    output_id: str
    created: bool

    @property
    def message(self) -> str:
        """What the UI shows: ``Saved #123``."""
        return f"Saved #{self.id}"


@dataclass(frozen=True)
class OutputRecord:
    """A model output as recorded when a task produced it (before anyone rated it)."""

    id: str
    task: str
    model_id: str | None
    model_revision: str | None
    backend: str | None
    model_info: dict[str, Any]
    settings: dict[str, Any]
    inputs: dict[str, Any]          # text inputs: question, prompt, labels offered...
    output: dict[str, Any]          # the model's output, media replaced by refs in ``output_media``
    input_media: tuple[str, ...]    # content refs of the input media (image or audio)
    output_media: tuple[str, ...]   # content refs of generated images (text-to-image)
    input_key: str                  # identifies the input: splits and de-duplication group by it
    session: str | None
    app_version: str
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback record with the output it is about: everything a training example needs."""

    id: int
    annotator: str
    thumbs: int | None              # +1 thumbs up, -1 thumbs down
    correction: Any                 # str, list of labels, or {"image_ratings", "preferred"}
    comment: str | None
    created_at: datetime
    updated_at: datetime
    app_version: str
    output: OutputRecord = field(repr=False)

    @property
    def task(self) -> str:
        return self.output.task

    @property
    def output_id(self) -> str:
        return self.output.id
