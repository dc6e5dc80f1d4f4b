"""What every tab shares: the app context, the model picker, the output area, event wiring, messages.

A tab module describes its endpoint with two small functions and lets :func:`connect` do the rest:

* ``request(image, question, model, ...)``: the endpoint's inputs, in order and by name (the names
  are the API's parameter names) -> ``(model_id, task_inputs)`` for ``mmdemo.tasks``;
* ``present(result)``: a task result -> the values of the tab's own output components.

:func:`connect` wires the button to one queued, validated event in the shared model queue group, with
the API name, batching where the task batches, a loading note and readable errors. It records every
result in the feedback store (the result's ``output_id`` goes into ``details``). Every tab puts its
outputs in a :func:`results_column` and builds the part under them with :func:`output_area`: the
provenance line, the feedback row of :mod:`.feedback` and the raw result. A result is greyed out as
soon as an input changes or a new request starts, and cleared when that request fails.

Nothing here imports torch: handlers only call ``mmdemo.tasks``, the registry and the feedback store.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import inspect
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import gradio as gr
import gradio.queueing

from .. import tasks
from ..auth import AuthFile
from ..config import Settings
from ..errors import (
    AudioTooLongError,
    ImageTooLargeError,
    InvalidAudioError,
    InvalidImageError,
    InvalidInputError,
    MMDemoError,
    ModelLoadError,
    RequestInterrupted,
    TaskMismatchError,
    UnknownModelError,
)
from ..logs import request_id_set
from ..ops import Operations, registry_gauges
from ..registry import ModelRegistry
from ..security import Gatekeeper, visitor_of

if TYPE_CHECKING:
    from ..feedback import FeedbackStore
    from ..feedback.recorder import BackgroundRecorder
    from .feedback import FeedbackRow

log = logging.getLogger(__name__)

MODEL_QUEUE = "models"  # concurrency id shared by every event that runs a model
ADMIN_QUEUE = "admin"  # preload/unload from the Models panel: one at a time, beside the model queue
UNEXPECTED = ("Something went wrong on the server while handling this request (it has been logged). "
              "Please try again, or try another model.")
OUTPUT_RETENTION_SECONDS = 3600  # generated files older than this are deleted when new ones are written
STORE_RETRY_SECONDS = 30.0  # after the feedback store failed to open, calls wait this long before trying again
RESULTS_CLASS = "mmdemo-results"  # a tab's results column
STALE_CLASS = "mmdemo-stale"  # added to it while its result no longer matches the inputs (greyed out)

Request = Callable[..., tuple[str | None, dict[str, Any]]]
Present = Callable[[dict[str, Any]], tuple[Any, ...]]


# --- the app context ---------------------------------------------------------------------------------


def model_concurrency(settings: Settings) -> int:
    """Model calls run at once: ``settings.concurrency``, or when 0: 1 on a GPU, 2 on CPU.

    Decided without importing torch (seconds at start-up): an explicit device says it; for ``auto``
    an NVIDIA driver or Apple silicon counts as a GPU. The registry still picks the real device.
    """
    if settings.concurrency > 0:
        return settings.concurrency
    if settings.device != "auto":
        return 2 if settings.device == "cpu" else 1
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    nvidia = not hidden and (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists())
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    return 1 if nvidia or apple else 2


@dataclass
class AppContext:
    """What the tabs share: settings, the registry (the only owner of models), the feedback store,
    login and limits."""

    settings: Settings
    registry: ModelRegistry
    auth: AuthFile | None = None
    concurrency: int = field(init=False)
    _output_dir: Path | None = field(default=None, init=False, repr=False)
    _store: "FeedbackStore | None" = field(default=None, init=False, repr=False)
    _store_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _store_retry_at: float = field(default=0.0, init=False, repr=False)
    _recorder: "BackgroundRecorder | None" = field(default=None, init=False, repr=False)
    finetune_jobs: Any = field(default=None, init=False, repr=False)  # the fine-tuning queue (finetune_panel.runner_of)
    gate: Gatekeeper = field(init=False, repr=False)  # cookies, client addresses, login back-off, body limits
    ops: Operations = field(init=False, repr=False)  # health, metrics, draining (see mmdemo.ops)

    def __post_init__(self) -> None:
        self.concurrency = model_concurrency(self.settings)
        self.gate = Gatekeeper(self.settings, self.auth)
        self.ops = Operations(self.settings, store_check=lambda: self.open_store().ping())
        self.ops.metrics.set_gauges("models", registry_gauges(self.registry))

    @classmethod
    def create(cls, settings: Settings, registry: ModelRegistry | None = None,
               auth: AuthFile | None = None) -> "AppContext":
        return cls(settings, registry or tasks.open_registry(settings), auth)

    # -- who may do what --

    def role_of(self, request: gr.Request | None) -> str | None:
        """The caller's role: with a login file, the user's; without one, admin for a browser or client
        holding the admin cookie (from the admin link printed at start-up), else none. The peer address
        never counts."""
        username = getattr(request, "username", None)
        if self.gate.is_admin(username, visitor_of(request)):
            return "admin"
        return self.auth.role_of(username) if self.auth is not None else None

    def require_admin(self, request: gr.Request | None, action: str = "load or unload models") -> None:
        """Raise a readable ``gr.Error`` unless the caller is an admin; ``action`` names what was refused."""
        if self.role_of(request) == "admin":
            return
        if self.auth is None:
            raise gr.Error(f"Only admins can {action}. This app has no login: open the admin link mmdemo printed "
                           "when it started (.../admin-login?token=...) in this browser, or start it with an auth "
                           "file (MMDEMO_AUTH_FILE) and sign in as an admin.",
                           title="Not allowed", print_exception=False)
        name = getattr(request, "username", None) or "not signed in"
        raise gr.Error(f"Only admins can {action} ({name} is not an admin).",
                       title="Not allowed", print_exception=False)

    # -- feedback --

    @property
    def store(self) -> "FeedbackStore":
        """The feedback store, opened on first use (its migrations run then).

        Raises :class:`~mmdemo.feedback.StoreError` when it cannot be opened; the next attempt is made
        after ``STORE_RETRY_SECONDS``, so that an unreachable database does not slow every request.
        """
        if self._store is not None:
            return self._store
        from ..feedback import StoreError

        if time.monotonic() < self._store_retry_at:
            raise StoreError("The feedback store is unavailable; see the server log.")
        try:
            return self.open_store()
        except Exception as exc:
            self._store_retry_at = time.monotonic() + STORE_RETRY_SECONDS
            if isinstance(exc, StoreError):  # its message says what is wrong and how to recover
                log.error("opening the feedback store failed: %s", exc)
            else:
                log.exception("opening the feedback store failed")
            raise StoreError("The feedback store could not be opened; see the server log.") from None

    def open_store(self) -> "FeedbackStore":
        """The feedback store, opened now if it is not open yet. Raises the store's own error (naming the
        database, what is wrong with it and how to recover), which :attr:`store` keeps for the log."""
        from ..feedback import FeedbackStore

        with self._store_lock:
            if self._store is None:
                self._store = FeedbackStore.from_settings(self.settings)
        return self._store

    def close_store(self) -> None:
        """Close the feedback store (at shutdown, after the recorder is flushed)."""
        with self._store_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def annotator_of(self, request: gr.Request | None) -> str | None:
        """Who is asking: the login name, else the anonymous id of the visitor's signed cookie (set by the
        server's request guard; a client without the cookie is a new visitor each time, so nobody can
        choose another person's id). None when the request carries neither."""
        from ..feedback import anonymous_annotator

        visitor = visitor_of(request)
        return getattr(request, "username", None) or (anonymous_annotator(visitor.anonymous_id) if visitor else None)

    @property
    def recorder(self) -> "BackgroundRecorder":
        """Records results in the feedback store off the request's path (see :mod:`mmdemo.feedback.recorder`)."""
        if self._recorder is None:
            from ..feedback.recorder import BackgroundRecorder

            with self._store_lock:
                if self._recorder is None:
                    self._recorder = BackgroundRecorder(lambda: self.store,
                                                        on_recorded=lambda: self.ops.metrics.recorded("output"))
        return self._recorder

    def record(self, task: str, task_inputs: dict[str, Any], result: dict[str, Any],
               request: gr.Request | None) -> str | None:
        """Issue a result's ``output_id`` and record it in the background, so that it can be rated.

        A failure to record is logged and never fails the prediction; feedback on that id then says that
        the result could not be recorded. None when not even an id could be issued. ``request`` (who
        asked) may be None when unknown.
        """
        try:
            self.store  # noqa: B018 - opened once (at start-up, in the background); unavailable: no id
            return self.recorder.record(task, task_inputs, result, session=self.annotator_of(request))
        except MMDemoError as exc:
            log.warning("a %s result was not recorded for feedback: %s", task, exc)
        except Exception:
            log.exception("recording a %s result for feedback failed", task)
        return None

    # -- files the app writes --

    def output_dir(self) -> Path:
        """The folder of files the app hands out (generated images, exports); entries older than an hour
        are removed first."""
        if self._output_dir is None:
            self._output_dir = Path(tempfile.mkdtemp(prefix="mmdemo-outputs-"))
        cutoff = time.time() - OUTPUT_RETENTION_SECONDS
        for old in self._output_dir.iterdir():
            try:
                if old.stat().st_mtime >= cutoff:
                    continue
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
            except FileNotFoundError:  # removed by a concurrent call
                pass
        return self._output_dir

    def output_path(self, stem: str, suffix: str = ".png") -> Path:
        """A new file path for generated output in :meth:`output_dir`."""
        return self.output_dir() / f"{stem}-{os.urandom(4).hex()}{suffix}"


# --- messages ----------------------------------------------------------------------------------------


def error_title(exc: MMDemoError) -> str:
    if isinstance(exc, InvalidInputError):
        return "Please check the input"
    if isinstance(exc, ModelLoadError):
        return "The model could not be loaded"
    if isinstance(exc, UnknownModelError):
        return "Unknown model"
    if isinstance(exc, RequestInterrupted):
        return "Interrupted"
    return "The model could not answer"


def readable_errors(fn: Callable) -> Callable:
    """Turn mmdemo's errors into ``gr.Error`` with their message; anything else into a generic
    message (the traceback goes to the log, not to the person)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MMDemoError as exc:
            raise gr.Error(str(exc), title=error_title(exc), print_exception=False) from None
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__qualname__", fn))
            raise gr.Error(UNEXPECTED, title="Something went wrong", print_exception=False) from None

    return wrapper


def validated_api(fn: Callable, validator: Callable[..., list[dict[str, Any]]], *, api_name: str,
                  **options: Any) -> None:
    """``gr.api(fn, api_name=..., **options)`` with ``validator`` (one ``gr.validate`` per parameter) run
    before each call joins the queue; gradio_client raises its refusals as ValidationError. gradio 6.31's
    ``gr.api`` takes no validator, so it is set on the function gr.api registers."""
    from gradio.context import get_blocks_context

    gr.api(fn, api_name=api_name, **options)
    blocks = get_blocks_context()
    registered = next(block_fn for block_fn in blocks.fns.values() if block_fn.api_name == api_name)
    registered.validator = validator


def blamed_input(exc: MMDemoError, media: str | None, text: str, names: Sequence[str] = ()) -> str:
    """The input a validation message is shown on: the endpoint parameter among ``names`` that the error
    names (its ``field``), else the media, the model, or the tab's main text."""
    if isinstance(exc, InvalidInputError) and exc.field in names:
        return exc.field
    if media and isinstance(exc, (InvalidImageError, ImageTooLargeError, InvalidAudioError, AudioTooLongError)):
        return media
    if isinstance(exc, (UnknownModelError, TaskMismatchError)):
        return "model"
    return text


def answered_in(status: gr.Markdown, refused: str = "Not done") -> Callable[[Callable], Callable]:
    """For a button's handler whose outputs include ``status``, the Markdown beside the button: a refusal
    or a failure is said there ("**Not allowed:** ..."; ``refused`` titles mmdemo's errors) and the other
    outputs stay as they were, instead of a toast or an error pill far from the button."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error as exc:
                title, message = (exc.title if exc.title != "Error" else refused), exc.message
            except MMDemoError as exc:
                title, message = refused, str(exc)
            except Exception:
                log.exception("unexpected error in %s", getattr(fn, "__qualname__", fn))
                title, message = "Something went wrong", UNEXPECTED
            return {status: f"**{title}:** {message}"}

        return wrapper

    return decorate


# --- inputs and outputs ------------------------------------------------------------------------------


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


def model_picker(ctx: AppContext, task: str, label: str = "Model") -> tuple[gr.Dropdown, gr.Markdown]:
    """The model dropdown of a tab, filled from the catalog, and its note line.

    The choices are read from the catalog again on every page load, so a model that joined it while the
    app runs (a fine-tuned one: Models -> Fine-tune) is offered after a reload, without a restart.
    """
    def choices() -> list[str]:
        return [spec.id for spec in ctx.registry.catalog.for_task(task)]

    ids = choices()
    model = gr.Dropdown(choices=ids, value=ids[0] if ids else None, label=label, interactive=True)
    note = gr.Markdown(elem_classes="mmdemo-note")
    # On page load only (no triggers, no inputs): today's choices; the value is not sent, so it stays.
    gr.on(None, lambda: gr.Dropdown(choices=choices()), None, [model], queue=False, show_progress="hidden",
          api_visibility="private")
    # No triggers: on page load and whenever the dropdown changes. Unprocessed: model_note checks the id against
    # today's catalog, not against the choices the page was built with.
    gr.on(None, functools.partial(model_note, ctx), inputs=[model], outputs=[note], queue=False, preprocess=False,
          show_progress="hidden", api_visibility="private")
    return model, note


def results_column() -> gr.Column:
    """The column that holds a tab's outputs and its :func:`output_area` (greyed out while stale)."""
    return gr.Column(elem_classes=RESULTS_CLASS)


@dataclass
class OutputArea:
    """The part under every tab's outputs: the provenance line, the feedback row and the raw result
    (whose ``output_id`` the feedback row saves against), in the tab's results column."""

    footer: gr.Markdown
    feedback: "FeedbackRow"
    details: gr.JSON
    results: gr.Column

    @property
    def components(self) -> list[gr.components.Component]:
        """The outputs of a task event (the feedback row is filled by a step after it)."""
        return [self.footer, self.details]

    @staticmethod
    def values(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return footer_line(result), json_safe(result)


def output_area(ctx: AppContext, task: str, results: gr.Column) -> OutputArea:
    """The provenance line, the feedback row for ``task`` and the raw result, under a tab's own outputs in
    ``results`` (its :func:`results_column`; the labels name the task event's outputs in the API:
    ``answered_by``, ``details``)."""
    from .feedback import feedback_row  # feedback builds on this module

    footer = gr.Markdown(label="Answered by", show_label=False, elem_classes="mmdemo-footer")
    row = feedback_row(ctx, task)
    with gr.Accordion("Details (JSON)", open=False):
        details = gr.JSON(label="Details", show_label=False)
    row.connect(details)
    return OutputArea(footer, row, details, results)


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


# --- wiring ------------------------------------------------------------------------------------------


def run_grouped(ctx: AppContext, task: str, requests: list[tuple[str | None, dict[str, Any]]]) -> list[dict]:
    """Run a batch formed by the queue: one ``run_batch`` call per model, results in request order."""
    groups: dict[str | None, list[int]] = {}
    for index, (model_id, _) in enumerate(requests):
        groups.setdefault(model_id, []).append(index)
    results: list[dict[str, Any]] = [{} for _ in requests]
    for model_id, indices in groups.items():
        outputs = tasks.run_batch(ctx.registry, task, model_id, [requests[i][1] for i in indices])
        for index, result in zip(indices, outputs):
            result.setdefault("batch", len(indices))  # a task may say its model calls were shared by fewer
            results[index] = result
    return results


def input_validator(ctx: AppContext, task: str, request: Request, media: str | None, text: str) -> Callable:
    """Checks one request before it joins the queue (``tasks.prepare``: decoding, limits, model id), so
    that bad input never waits in line, never holds a model and never fails a batch it would join.
    The message is shown on the input it concerns (and raised by gradio_client as ValidationError)."""
    names = list(inspect.signature(request).parameters)

    def validate(*values: Any) -> list[dict[str, Any]]:
        try:
            model_id, inputs = request(*values)
            tasks.prepare(ctx.registry, task, model_id, inputs)
        except MMDemoError as exc:
            blamed = blamed_input(exc, media, text, names)
            return [gr.validate(name != blamed, str(exc) if name == blamed else "") for name in names]
        except Exception:  # noqa: BLE001 - the handler will meet it again and report it
            log.exception("validating a %s request failed", task)
        return [gr.validate(True, "") for _ in names]

    return validate


def connect(
    ctx: AppContext,
    *,
    task: str,
    button: gr.Button,
    request: Request,
    inputs: Sequence[gr.components.Component],
    present: Present,
    outputs: Sequence[gr.components.Component],
    area: OutputArea,
    api_name: str,
    model: gr.Dropdown,
    note: gr.Markdown,
    media: str | None,
    text: str,
    batch: bool = False,
    step_progress: bool = False,
    triggers: Sequence[Any] = (),
    interrupt: gr.Button | None = None,
) -> Any:
    """Wire ``button`` (and ``triggers``) to the task: the endpoint ``/api_name``, in the shared model
    queue group, validated before queueing, batched if ``batch``, with a loading note and readable errors.
    Each result is recorded for feedback (``output_id`` in ``details``) and fills the feedback row.
    The result is greyed out when an input changes or a request starts, and cleared when one fails.
    ``interrupt`` (with ``step_progress``) stops the caller's running request after its current step.

    ``inputs`` are the components behind ``request``'s parameters, in the same order.
    """
    names = list(inspect.signature(request).parameters)
    if len(names) != len(inputs):
        raise ValueError(f"{api_name}: request takes {names} but {len(inputs)} inputs were given")
    if interrupt is not None and batch:
        raise ValueError(f"{api_name}: a batched event cannot be interrupted per request")
    stop_flags = StopFlags() if interrupt is not None else None

    def finish(requests: list[tuple[str | None, dict[str, Any]]], results: list[dict[str, Any]],
               caller: gr.Request | None) -> list[tuple[Any, ...]]:
        """Record each result (before ``present``, which may replace its images), then the output values."""
        for (_, task_inputs), result in zip(requests, results):
            result["output_id"] = ctx.record(task, task_inputs, result, caller)
        return [(*present(result), *area.values(result)) for result in results]

    request_parameter = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
    if batch:
        def handler(*values: Any) -> list[list[Any]]:
            *columns, caller = values
            requests = [request(*row) for row in zip(*columns)]
            ctx.ops.metrics.batch_size.labels(task).observe(len(requests))
            with ctx.ops.metrics.timed(task, [model_id for model_id, _ in requests]):
                results = run_grouped(ctx, task, requests)
            # gradio hands a batch the first request's gr.Request only: who asked is known for a batch of one
            rows = finish(requests, results, caller if len(requests) == 1 else None)
            return [list(column) for column in zip(*rows)]
        parameters = [*inspect.signature(request).parameters.values(), request_parameter]
    else:
        def handler(*values: Any) -> tuple[Any, ...]:
            *values, progress, caller = values
            model_id, task_inputs = request(*values)
            if model_id and not ctx.registry.is_loaded(model_id):
                progress(0, desc=f"Loading {model_id}")
            if step_progress:
                task_inputs["progress"] = lambda step, total: progress((step, total), desc="Denoising", unit="steps")
            with ctx.ops.metrics.timed(task, [model_id]):
                if stop_flags is None:
                    result = tasks.run(ctx.registry, task, model_id, **task_inputs)
                else:
                    with stop_flags.running(caller) as should_stop:
                        result = tasks.run(ctx.registry, task, model_id, should_stop=should_stop, **task_inputs)
            return finish([(model_id, task_inputs)], [result], caller)[0]
        parameters = [*inspect.signature(request).parameters.values(),
                      inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
                      request_parameter]
    # gradio reads parameter names (the API's) and special arguments (progress, the request) from the
    # signature and the annotations.
    handler.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    handler.__annotations__ = {"request": gr.Request}
    handler.__name__ = handler.__qualname__ = api_name

    validate = input_validator(ctx, task, request, media, text)
    main = dict(
        fn=readable_errors(with_request_id(handler)),
        inputs=list(inputs),
        outputs=[*outputs, *area.components],
        api_name=api_name,
        validator=validate,
        preprocess=False,  # the media layer decodes uploads itself, with its limits and messages
        concurrency_id=MODEL_QUEUE,
        concurrency_limit=ctx.concurrency,
        batch=batch,
        max_batch_size=max(1, ctx.settings.max_batch),
        show_progress_on=[outputs[0]],  # one progress display, on the main output
    )
    quick = dict(queue=False, show_progress="hidden", api_visibility="private")
    # The shown result and its feedback row: cleared when a request fails, so that no old result (or
    # "Saved #1") stands beside the new error.
    shown = [*outputs, *area.components, area.feedback.box, area.results]

    def cleared() -> list[Any]:
        return [*(None for _ in [*outputs, *area.components]), gr.Column(visible=False), results_shown(False)]

    def start_request(*values: Any) -> list[Any]:
        """Before the request joins the queue: a refused one clears the old result at once; an accepted one
        greys it out until its own arrives (and, batched, says when the model is loading: a batched call
        cannot report progress)."""
        if not all(check["is_valid"] for check in validate(*values)):
            return [gr.skip(), *cleared()]
        loading = loading_note(ctx, values[names.index("model")]) if batch else gr.skip()
        return [loading, *(gr.skip() for _ in shown[:-1]), results_shown(True)]

    start = gr.on([button.click, *triggers], start_request, inputs=list(inputs), outputs=[note, *shown],
                  preprocess=False, **quick)
    event = start.then(**main)
    event.then(functools.partial(model_note, ctx), inputs=[model], outputs=[note], **quick)
    event.success(lambda: results_shown(False), None, [area.results], **quick)
    event.failure(cleared, None, shown, **quick)
    gr.on([component.change for component in inputs], lambda: results_shown(True), None, [area.results], **quick)
    if stop_flags is not None:
        interrupt.click(stop_flags.stop, None, None, **quick)
    area.feedback.follow(event)
    return event


def with_request_id(handler: Callable) -> Callable:
    """``handler`` (its last argument the ``gr.Request``) logging with the id of the request that queued it:
    gradio's queue runs it outside that request."""

    @functools.wraps(handler)
    def wrapper(*values: Any) -> Any:
        visitor = visitor_of(values[-1]) if values else None
        with request_id_set(visitor.request_id if visitor else None):
            return handler(*values)

    return wrapper


class StopFlags:
    """One stop flag per browser session with a running request, set by the Interrupt button: the task
    checks it after each step (no state is shared between requests or kept on the model)."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, caller: gr.Request | None) -> Iterator[Callable[[], bool]]:
        """While a request of ``caller``'s session runs: its ``should_stop``."""
        session = getattr(caller, "session_hash", None)
        flag = threading.Event()
        if session:
            with self._lock:
                self._flags[session] = flag
        try:
            yield flag.is_set
        finally:
            with self._lock:
                if session and self._flags.get(session) is flag:
                    del self._flags[session]

    def stop(self, request: gr.Request) -> None:
        """Stop the running request of ``request``'s session, if any."""
        with self._lock:
            flag = self._flags.get(getattr(request, "session_hash", None) or "")
        if flag is not None:
            flag.set()


def standalone(build: Callable[[AppContext], SimpleNamespace], ctx: AppContext, title: str) -> gr.Blocks:
    """One tab as its own app (for tests and for working on a single tab); queue configured."""
    from .feedback import feedback_api

    with gr.Blocks(title=title) as demo:
        build(ctx)
        feedback_api(ctx)
    return configure_queue(demo, ctx)


def configure_queue(demo: gr.Blocks, ctx: AppContext) -> gr.Blocks:
    """The app's queue: at most ``max_queue`` requests wait for the models; quick events (feedback, admin)
    have room beside them, so a full model queue never refuses a feedback save."""
    demo.mmdemo_queue_limits = {MODEL_QUEUE: ctx.settings.max_queue}
    return demo.queue(max_size=2 * ctx.settings.max_queue, default_concurrency_limit=ctx.concurrency)


# --- gradio compatibility -------------------------------------------------------------------------------


def _validate_single_requests() -> None:
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
    gradio.queueing.create_validator_fn = create_validator_fn


def _bound_queue_groups() -> None:
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
    gradio.queueing.Queue.push = push


_validate_single_requests()
_bound_queue_groups()
