"""mmdemo's changes to gradio's behaviour, in one place, for the gradio version they were written against.

:func:`install` (called by the app builder, :func:`mmdemo.ui.events.configure_queue`) applies them once;
importing this module changes nothing. On another gradio version the patches are not applied and a
warning says so: check each one (``tests/test_gradio_patches.py`` says whether gradio still has the bug
and whether the patched function still looks as expected), then add the version to ``FOR_GRADIO``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import gradio
import gradio.queueing

log = logging.getLogger(__name__)

FOR_GRADIO = ("6.31.0",)  # the versions the patches were checked against


class UncheckedGradioWarning(UserWarning):
    """The installed gradio is not one the patches were checked against: they are not applied."""


def validate_single_requests() -> None:
    """gradio 6.31 runs an event's validator with the event's ``batch`` flag, although it always
    validates a single request (at queue join); for a batched event with several inputs the validator
    then fails before it is called. Validators see one request: build them unbatched."""
    original = gradio.queueing.create_validator_fn
    if getattr(original, "mmdemo_single_request", False):
        return

    def create_validator_fn(fn: Any) -> Any:
        validator = original(fn)
        validator.batch = False
        return validator

    create_validator_fn.mmdemo_single_request = True  # type: ignore[attr-defined]
    create_validator_fn.__wrapped__ = original  # type: ignore[attr-defined]
    gradio.queueing.create_validator_fn = create_validator_fn


def bound_queue_groups() -> None:
    """gradio 6.31 bounds the length of all its queues together (``max_size``). This adds a bound per
    concurrency group, read from ``blocks.mmdemo_queue_limits``: a request joining a full group is
    refused as gradio refuses one when its queue is full."""
    original = gradio.queueing.Queue.push
    if getattr(original, "mmdemo_group_bounds", False):
        return

    async def push(self: Any, body: Any, request: Any, username: str | None) -> Any:
        limits = getattr(self.blocks, "mmdemo_queue_limits", None)
        if limits and body.fn_index is not None:
            group = self.blocks.fns[body.fn_index].concurrency_id
            waiting = self.event_queue_per_concurrency_id.get(group)
            if group in limits and waiting is not None and len(waiting.queue) >= limits[group]:
                return False, f"Queue is full. Max size is {limits[group]} and size is {len(waiting.queue)}.", \
                    "queue_full"
        return await original(self, body, request, username)

    push.mmdemo_group_bounds = True  # type: ignore[attr-defined]
    push.__wrapped__ = original  # type: ignore[attr-defined]
    gradio.queueing.Queue.push = push


PATCHES = (validate_single_requests, bound_queue_groups)


def install(version: str | None = None) -> bool:
    """Apply every patch (once; again is a no-op). On a gradio version not in ``FOR_GRADIO`` nothing is
    patched and an :class:`UncheckedGradioWarning` says so. True when the patches are in place."""
    version = version or gradio.__version__
    if version not in FOR_GRADIO:
        message = (f"gradio {version} is not a version mmdemo's gradio patches were checked against "
                   f"({', '.join(FOR_GRADIO)}): they are not applied. Batched events with several inputs may fail "
                   "validation, and the model queue is bounded only by gradio's overall queue size.")
        warnings.warn(message, UncheckedGradioWarning, stacklevel=2)
        log.warning(message)
        return False
    for patch in PATCHES:
        patch()
    return True
