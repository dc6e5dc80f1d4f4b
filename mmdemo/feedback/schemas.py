"""Feedback values every task shares (rating, comment, annotator), and the task's schema by name.

Each task's own schema (inputs, correction, exported rows) is part of its descriptor
(``mmdemo.tasks.task_spec(task).schema``, base class in :mod:`mmdemo.tasks.schema`); :func:`schema_for`
looks it up. Importing this module imports no task module: the lookup does, on first use.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from ..errors import InvalidFeedbackError, UnknownTaskError
from ..inputs import check_characters
from ..tasks.schema import (MAX_CORRECTION_BYTES, MAX_IMAGE_RATING, MAX_JSON_BYTES, MAX_TEXT_INPUT_CHARS, Example,
                            TaskSchema, check_correction_size, digest, format_bytes, to_json)
from ..tasks.spec import task_ids, task_spec

__all__ = ["MAX_CORRECTION_BYTES", "MAX_IMAGE_RATING", "MAX_JSON_BYTES", "MAX_TEXT_INPUT_CHARS", "Example",
           "TaskSchema", "anonymous_annotator", "check_correction_size", "clean_annotator", "clean_comment",
           "clean_thumbs", "digest", "format_bytes", "schema_for", "split_request", "task_ids", "to_json"]

MAX_COMMENT_CHARS = 4000
MAX_ANNOTATOR_CHARS = 200


# --- feedback values common to every task ----------------------------------------------------------


def clean_thumbs(thumbs: Any) -> int | None:
    """+1 (thumbs up), -1 (thumbs down) or None."""
    if thumbs is None:
        return None
    if isinstance(thumbs, bool) or not isinstance(thumbs, int) or thumbs not in (1, -1):
        raise InvalidFeedbackError(f"The rating must be +1 (thumbs up) or -1 (thumbs down), not {thumbs!r}.")
    return thumbs


def clean_comment(comment: Any) -> str | None:
    """An optional free comment; an empty box means no comment."""
    if comment is None:
        return None
    if not isinstance(comment, str):
        raise InvalidFeedbackError("The comment must be text.")
    comment = check_characters(comment.strip(), "comment", InvalidFeedbackError)
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidFeedbackError(
            f"The comment is {len(comment):,} characters long; the limit is {MAX_COMMENT_CHARS:,}."
        )
    return comment or None


def clean_annotator(annotator: Any) -> str:
    """A login name or a stable anonymous session id (see :func:`anonymous_annotator`)."""
    if not isinstance(annotator, str) or not annotator.strip():
        raise InvalidFeedbackError("Feedback needs an annotator: a login name or an anonymous session id.")
    annotator = annotator.strip()
    if len(annotator) > MAX_ANNOTATOR_CHARS or not annotator.isprintable():
        raise InvalidFeedbackError(
            f"The annotator id must be printable and at most {MAX_ANNOTATOR_CHARS} characters long."
        )
    return annotator


def anonymous_annotator(session_id: str) -> str:
    """A stable id for a person who is not logged in: ``anon-`` and a hash of their session id.

    The raw session id (a secret that identifies a browser) is never stored.
    """
    if not session_id:
        raise InvalidFeedbackError("An anonymous annotator needs a session id.")
    return "anon-" + hashlib.sha256(f"mmdemo-session\0{session_id}".encode()).hexdigest()[:16]


def split_request(task: str, request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the keyword inputs a task ran with into ``(inputs, settings)`` for ``record_output``.

    Inputs are the task's media field and text inputs; settings every other value that was given
    (not None), except callables (a progress callback is no setting).
    """
    schema = schema_for(task)
    names = set(schema.text_inputs) | ({schema.media_input} if schema.media_input else set())
    inputs = {k: v for k, v in request.items() if k in names}
    settings = {k: v for k, v in request.items() if k not in names and v is not None and not callable(v)}
    return inputs, settings


def schema_for(task: Any) -> TaskSchema:
    """The feedback schema of task id ``task``, or :class:`UnknownTaskError` listing the tasks."""
    spec = task_spec(task)
    if spec.id != task:  # aliases are for people; stored rows carry the id
        raise UnknownTaskError(f"Unknown task {task!r}: use the task's id, {spec.id}.")
    return spec.schema

