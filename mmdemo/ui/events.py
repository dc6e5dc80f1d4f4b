"""Event wiring every tab shares: :func:`connect` turns a tab's ``request``/``present`` pair into one queued,
validated endpoint in the shared model queue group, with the output area under it (:func:`output_area`:
provenance, the feedback row, the raw result); :func:`standalone` makes one tab an app of its own and
:func:`configure_queue` sets the app's queue.

A tab module describes its endpoint with two small functions:

* ``request(image, question, model, ...)``: the endpoint's inputs, in order and by name (the names
  are the API's parameter names) -> ``(model_id, task_inputs)`` for ``mmdemo.tasks``;
* ``present(result)``: a task result -> the values of the tab's own output components.

:func:`connect` also gives the tab its Compare mode (:mod:`.compare`: two models, a blind vote).

:func:`connect` records every result in the feedback store (the result's ``output_id`` goes into
``details``). A result is greyed out as soon as an input changes or a new request starts, and cleared
when that request fails.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import gradio as gr

from .. import tasks
from ..application import App as AppContext
from ..errors import MMDemoError
from ..logs import request_id_set
from ..security import visitor_of
from . import gradio_patches
from .compare import CompareTarget, compare_mode, vote_api
from .feedback import FeedbackRow, feedback_api, feedback_row
from .messages import blamed_input, readable_errors
from .widgets import footer_line, json_safe, loading_note, model_note, results_shown

log = logging.getLogger(__name__)

MODEL_QUEUE = "models"  # concurrency id shared by every event that runs a model
ADMIN_QUEUE = "admin"  # preload/unload from the Models panel: one at a time, beside the model queue

Request = Callable[..., tuple[str | None, dict[str, Any]]]
Present = Callable[[dict[str, Any]], tuple[Any, ...]]


@dataclass
class OutputArea:
    """The part under every tab's outputs: the provenance line, the feedback row and the raw result
    (whose ``output_id`` the feedback row saves against), in the tab's results column."""

    footer: gr.Markdown
    feedback: FeedbackRow
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
    footer = gr.Markdown(label="Answered by", show_label=False, elem_classes="mmdemo-footer")
    row = feedback_row(ctx, task)
    with gr.Accordion("Details (JSON)", open=False):
        details = gr.JSON(label="Details", show_label=False)
    row.connect(details)
    return OutputArea(footer, row, details, results)


def run_grouped(ctx: AppContext, task: str, requests: list[tuple[str | None, dict[str, Any]]],
                caller: gr.Request | None) -> list[dict]:
    """Answer a batch formed by the queue: one :func:`mmdemo.tasks.predict_batch` per model, each result
    recorded for feedback (its ``output_id`` in the result), results in request order."""
    groups: dict[str | None, list[int]] = {}
    for index, (model_id, _) in enumerate(requests):
        groups.setdefault(model_id, []).append(index)
    results: list[dict[str, Any]] = [{} for _ in requests]
    record = ctx.recorder_for(caller)
    for model_id, indices in groups.items():
        predictions = tasks.predict_batch(ctx.registry, task, model_id, [requests[i][1] for i in indices],
                                          record=record)
        for index, prediction in zip(indices, predictions):
            prediction.result.setdefault("batch", len(indices))  # a task may say its calls were shared by fewer
            results[index] = prediction.result
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

    def finish(results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The output values of recorded results (``present`` may replace images: they were recorded first)."""
        return [(*present(result), *area.values(result)) for result in results]

    request_parameter = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
    if batch:
        def handler(*values: Any) -> list[list[Any]]:
            *columns, caller = values
            # a request naming no model gets the task's default now (a promotion may switch it): resolved once
            # here, so the metrics, the batch groups and the answer name the model that ran
            default = ctx.registry.catalog.default_for(task).id
            requests = [(model_id or default, task_inputs)
                        for model_id, task_inputs in (request(*row) for row in zip(*columns))]
            ctx.ops.metrics.batch_size.labels(task).observe(len(requests))
            with ctx.ops.metrics.timed(task, [model_id for model_id, _ in requests]):
                # gradio hands a batch the first request's gr.Request only: who asked is known for a batch of one
                results = run_grouped(ctx, task, requests, caller if len(requests) == 1 else None)
            rows = finish(results)
            return [list(column) for column in zip(*rows)]
        parameters = [*api_parameters(request), request_parameter]
    else:
        def handler(*values: Any) -> tuple[Any, ...]:
            *values, progress, caller = values
            model_id, task_inputs = request(*values)
            model_id = model_id or ctx.registry.catalog.default_for(task).id  # the task's default now
            if not ctx.registry.is_loaded(model_id):
                progress(0, desc=f"Loading {model_id}")
            if step_progress:
                task_inputs["progress"] = lambda step, total: progress((step, total), desc="Denoising", unit="steps")
            record = ctx.recorder_for(caller)
            with ctx.ops.metrics.timed(task, [model_id]):
                if stop_flags is None:
                    prediction = tasks.predict(ctx.registry, task, model_id, task_inputs, record=record)
                else:
                    with stop_flags.running(caller) as should_stop:
                        prediction = tasks.predict(ctx.registry, task, model_id,
                                                   {**task_inputs, "should_stop": should_stop}, record=record)
            return finish([prediction.result])[0]
        parameters = [*api_parameters(request),
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
    compare_mode(ctx, CompareTarget(task, request, list(inputs), present, list(outputs), api_name, model, media, text),
                 queue=dict(concurrency_id=MODEL_QUEUE, concurrency_limit=ctx.concurrency), wrap=with_request_id)
    return event


def api_parameters(request: Request) -> list[inspect.Parameter]:
    """``request``'s parameters as the endpoint's, ``model`` optional (None; and those after it, as Python
    wants): a client that names no model gets the task's default of that moment, promoted or not."""
    parameters = list(inspect.signature(request).parameters.values())
    names = [parameter.name for parameter in parameters]
    if "model" not in names:
        return parameters
    start = names.index("model")
    return [*parameters[:start], *(parameter.replace(default=None) if parameter.default is inspect.Parameter.empty
                                   else parameter for parameter in parameters[start:])]


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
    with gr.Blocks(title=title) as demo:
        build(ctx)
        feedback_api(ctx)
        vote_api(ctx)
    return configure_queue(demo, ctx)


def configure_queue(demo: gr.Blocks, ctx: AppContext) -> gr.Blocks:
    """The app's queue: at most ``max_queue`` requests wait for the models; quick events (feedback, admin)
    have room beside them, so a full model queue never refuses a feedback save. Installs mmdemo's gradio
    patches (:mod:`.gradio_patches`), which these settings rely on."""
    gradio_patches.install()
    demo.mmdemo_queue_limits = {MODEL_QUEUE: ctx.settings.max_queue}
    return demo.queue(max_size=2 * ctx.settings.max_queue, default_concurrency_limit=ctx.concurrency)
