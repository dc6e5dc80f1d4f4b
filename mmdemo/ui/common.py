"""What every tab shares, in one import: the app (``AppContext``, the :class:`~mmdemo.application.App` the UI
is built over), the event wiring of :mod:`.events`, the widgets of :mod:`.widgets` and the messages of
:mod:`.messages`.

Tab modules import from here (``from .common import AppContext, connect, model_picker, ...``); the pieces
live in those modules by concern. ``feedback`` sits below ``events`` (the output area holds its row) and
imports from ``messages`` and ``widgets`` directly. Nothing here imports torch.
"""

from __future__ import annotations

from ..application import App
from .events import (
    ADMIN_QUEUE,
    MODEL_QUEUE,
    OutputArea,
    Present,
    Request,
    StopFlags,
    configure_queue,
    connect,
    input_validator,
    output_area,
    run_grouped,
    standalone,
    with_request_id,
)
from .messages import UNEXPECTED, answered_in, blamed_input, error_title, readable_errors, validated_api
from .widgets import (
    ASSETS_DIR,
    EXPORT_ONLY,
    NO_MEDIA,
    NOT_LOADED_NOTES,
    RESULTS_CLASS,
    STALE_CLASS,
    asset,
    default_model,
    examples,
    footer_line,
    format_bytes,
    format_seconds,
    json_safe,
    loading_note,
    media_source,
    model_note,
    model_picker,
    results_column,
    results_shown,
)

AppContext = App  # the name the tabs know the app by

__all__ = [
    "ADMIN_QUEUE", "ASSETS_DIR", "EXPORT_ONLY", "MODEL_QUEUE", "NOT_LOADED_NOTES", "NO_MEDIA", "RESULTS_CLASS",
    "STALE_CLASS", "UNEXPECTED", "AppContext", "OutputArea", "Present", "Request", "StopFlags", "answered_in",
    "asset", "blamed_input", "configure_queue", "connect", "default_model", "error_title", "examples", "footer_line",
    "format_bytes", "format_seconds", "input_validator", "json_safe", "loading_note", "media_source",
    "model_note", "model_picker", "output_area", "readable_errors", "results_column", "results_shown",
    "run_grouped", "standalone", "validated_api", "with_request_id",
]
