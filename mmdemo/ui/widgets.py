"""Small pieces every tab shows: the model picker and its note, the results column (greyed out while stale),
the provenance line, media inputs sent unprocessed, examples, and formatting helpers."""

from __future__ import annotations

import base64
import binascii
import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

from ..application import App as AppContext
from ..errors import InvalidAudioError, InvalidImageError, UnknownModelError

RESULTS_CLASS = "mmdemo-results"  # a tab's results column


STALE_CLASS = "mmdemo-stale"  # added to it while its result no longer matches the inputs (greyed out)
# The feedback an export or a fine-tuning run takes (label, value), as the store's ``only`` has them.
EXPORT_ONLY = [("approved: corrected or thumbs up", "approved"), ("corrected only", "corrected"),
               ("all feedback", "all")]


NO_MEDIA = {
    "image": (InvalidImageError, "Please add an image: upload one, take one with the webcam or paste one."),
    "audio": (InvalidAudioError, "Please add some speech: record it with the microphone or upload a file."),
}


def media_source(value: Any, kind: str) -> Any:
    """The file behind an image or audio input sent unprocessed: its path (or a data URL's bytes)."""
    if isinstance(value, dict):
        if value.get("path"):
            return value["path"]
        url = value.get("url") or ""
        if url.startswith("data:") and "," in url:
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=False)
            except (binascii.Error, ValueError):
                raise NO_MEDIA[kind][0]("The uploaded data is not valid base64.") from None
        value = None
    if value is None:
        error, message = NO_MEDIA[kind]
        raise error(message)
    return value


NOT_LOADED_NOTES = {
    "local": "Not loaded yet: the first request loads it, which can take a while.",
    "hub": "Not downloaded yet: the first request downloads it from the Hub, which can take a while.",
    "unavailable": "Not available here: the Hub cannot be reached and this model is not in the local cache. "
                   "Choose another model.",
}


def model_note(ctx: AppContext, model_id: str | None) -> str:
    """One line under a model dropdown: what the model is and whether it is loaded."""
    if not model_id or model_id not in ctx.registry.catalog:
        return ""
    spec = ctx.registry.catalog.get(model_id)
    status = ctx.registry.status()
    loaded = {entry["id"]: entry for entry in status["loaded"]}
    if model_id in loaded:
        entry = loaded[model_id]
        state = f"Loaded on {entry['device']} ({entry['dtype']}, {format_bytes(entry['memory_bytes'])})."
    elif model_id in status["loading"]:
        state = "Loading..."
    elif model_id in status["errors"]:
        state = f"The last attempt to load it failed: {status['errors'][model_id]}"
    else:
        state = NOT_LOADED_NOTES[ctx.registry.availability(spec)]
    return f"{spec.description}  \n*{state}*"


def loading_note(ctx: AppContext, model_id: str | None) -> Any:
    """Shown when a request starts: says that the model is being loaded, if it is not loaded yet."""
    if model_id and model_id in ctx.registry.catalog and not ctx.registry.is_loaded(model_id):
        return f"*Loading {model_id} (first use); the answer follows once it is loaded...*"
    return gr.skip()


def default_model(ctx: AppContext, task: str) -> str | None:
    """The task's default model now (the promoted one, else the catalog's first); None when it has none."""
    try:
        return ctx.registry.catalog.default_for(task).id
    except UnknownModelError:
        return None


def model_picker(ctx: AppContext, task: str, label: str = "Model",
                 selected: Callable[[], str | None] | None = None) -> tuple[gr.Dropdown, gr.Markdown]:
    """The model dropdown of a tab, filled from the catalog, and its note line. ``selected``: the model to
    select on page load (default: the task's default).

    The choices and the selected model (the task's default: promoted, else the catalog's first) are read
    again on every page load, so a model that joined the catalog while the app runs (a fine-tuned one:
    Models -> Fine-tune) is offered after a reload without a restart, and a promoted one is selected. The
    dropdown has no value of its own: an API call that names no model gets the default of that moment.
    """
    def choices() -> list[str]:
        return [spec.id for spec in ctx.registry.catalog.for_task(task)]

    model = gr.Dropdown(choices=choices(), value=None, label=label, interactive=True)
    note = gr.Markdown(elem_classes="mmdemo-note")
    # On page load only (no triggers, no inputs): today's choices and default.
    pick = selected or (lambda: default_model(ctx, task))
    gr.on(None, lambda: gr.Dropdown(choices=choices(), value=pick()), None, [model], queue=False,
          show_progress="hidden", api_visibility="private")
    # No triggers: on page load and whenever the dropdown changes. Unprocessed: model_note checks the id against
    # today's catalog, not against the choices the page was built with.
    gr.on(None, functools.partial(model_note, ctx), inputs=[model], outputs=[note], queue=False, preprocess=False,
          show_progress="hidden", api_visibility="private")
    return model, note


def results_column() -> gr.Column:
    """The column that holds a tab's outputs and its :func:`output_area` (greyed out while stale)."""
    return gr.Column(elem_classes=RESULTS_CLASS)


def results_shown(stale: bool) -> gr.Column:
    """A results column greyed out (``stale``) or not."""
    return gr.Column(elem_classes=[RESULTS_CLASS, STALE_CLASS] if stale else [RESULTS_CLASS])


def footer_line(result: dict[str, Any]) -> str:
    """'model · device (dtype) · time', and the batch size when the request was batched."""
    model = result.get("model", {})
    parts = [f"**{model.get('id', '?')}**", f"{model.get('device', '?')} ({model.get('dtype', '?')})",
             format_seconds(result.get("seconds", 0.0))]
    if result.get("batch", 1) > 1:
        parts.append(f"batched with {result['batch'] - 1} other request{'s' if result['batch'] > 2 else ''}")
    return " · ".join(parts)


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_bytes(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n / 1024:.0f} KiB"


def json_safe(result: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(result, default=str))


ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"


def asset(name: str) -> str | None:
    """The path of an example file in the repository's ``assets/``, or None where it is missing
    (an install without the repository)."""
    path = ASSETS_DIR / name
    return str(path) if path.is_file() else None


def examples(rows: Sequence[Sequence[Any]], inputs: Sequence[gr.components.Component]) -> gr.Examples | None:
    """Ready examples for a tab; rows with a missing asset (None) are left out."""
    ready = [list(row) for row in rows if all(value is not None for value in row)]
    if not ready:
        return None
    return gr.Examples(ready, inputs=list(inputs), label="Examples", cache_examples=False)
