"""Feedback on every result: the row under each tab's outputs, and the ``/feedback`` endpoint.

Every result a tab shows is recorded in the feedback store and carries its ``output_id`` in
``details``. Under it, :func:`feedback_row` offers thumbs up / down, the correction the task needs
and a comment; its buttons and ``/feedback`` (for scripts) both save through :func:`save_feedback`,
one record per (output, annotator): saving again updates that record.

=============================  ===============================================================
caption, VQA, transcribe       the model's text, pre-filled, edited in place
zero-shot                      the right label(s): chosen from the labels offered or typed
text-to-image                  a 1-5 rating per image and, when several were made, the preferred one
=============================  ===============================================================

The store is imported on first use (it costs start-up time); nothing here imports torch.
"""

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gradio as gr

from ..application import App as AppContext
from ..inputs import check_characters
from ..tasks.spec import resolve, task_spec
from .messages import answered_in, readable_errors, validated_api, validation_results

FEEDBACK_QUEUE = "feedback"  # concurrency id of /feedback: beside the model queue, never behind it
FEEDBACK_CONCURRENCY = 16  # saves at once (quick database writes; SQLite commits them in groups)
MAX_IMAGES = 8  # text-to-image makes at most 8 images per request
THUMBS = {"up": 1, "+1": 1, "1": 1, "down": -1, "-1": -1}
UNAVAILABLE = ("*Feedback is unavailable for this result: it could not be recorded (the server log says "
               "why).*")
INTRO = ("**Is this right?** Rate it, or correct it and save: your feedback becomes fine-tuning data.")
MAX_CORRECTION_DEPTH = 8  # JSON nesting of a correction (text-to-image's is 2), checked before parsing it
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


# --- saving: one path for the buttons and the API --------------------------------------------------


def parse_thumbs(thumbs: Any) -> int | None:
    """``"up"`` / ``"down"``, +1 / -1 (as numbers or text), or None / ``""`` for no rating."""
    from ..feedback import InvalidFeedbackError

    if thumbs is None or thumbs == "":
        return None
    if isinstance(thumbs, int) and not isinstance(thumbs, bool) and thumbs in (1, -1):
        return thumbs
    if isinstance(thumbs, str) and thumbs.strip().lower() in THUMBS:
        return THUMBS[thumbs.strip().lower()]
    raise InvalidFeedbackError(f'thumbs must be "up" or "down" (or 1 / -1), not {thumbs!r}.')


def parse_correction(task: str, correction: str) -> Any:
    """A correction sent as text (the API's ``correction`` field), in the form the store takes for ``task``
    (its schema's ``parse_correction``: JSON for structured corrections, the text itself for text ones)."""
    schema = task_spec(task).schema
    if schema.correction_is_text:
        return correction
    check_correction_text(correction)
    return schema.parse_correction(correction)


def check_correction_text(correction: str) -> str:
    """Refuse correction text before it is parsed or stored: a character no database keeps alike (NUL, an
    unpaired surrogate), more than the store's limit, or JSON nested deeper than ``MAX_CORRECTION_DEPTH``
    (the parser would recurse once per level)."""
    from ..feedback import InvalidFeedbackError
    from ..feedback.schemas import check_correction_size

    check_characters(correction, "correction", InvalidFeedbackError)
    check_correction_size(len(correction.encode("utf-8")), "text")
    if correction.lstrip()[:1] in ("[", "{"):
        depth = deepest = 0
        for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub('""', correction)):
            depth += 1 if bracket in "[{" else -1
            deepest = max(deepest, depth)
        if deepest > MAX_CORRECTION_DEPTH:
            raise InvalidFeedbackError(
                f"The correction is JSON nested {deepest} levels deep; a correction needs at most 2 (the deepest "
                'is {"image_ratings": [...], "preferred": i}).')
    return correction


def check_correction(correction: Any) -> None:
    """What can be checked of a correction before its task is known: its text, or the labels of a list."""
    from ..feedback import InvalidFeedbackError

    if isinstance(correction, str):
        check_correction_text(correction)
    elif isinstance(correction, list):
        for item in correction:
            if isinstance(item, str):
                check_characters(item, "correction", InvalidFeedbackError)


def feedback_validator(parameters: Sequence[str]) -> Callable[..., list[dict[str, Any]]]:
    """A validator for an endpoint whose ``parameters`` include thumbs, correction and comment: each is
    checked as the store will check it, before the call joins the queue, and a refusal is said for that
    field (gradio_client raises ValidationError)."""
    from ..feedback.schemas import clean_comment

    checks: dict[str, Callable[[Any], Any]] = {"thumbs": parse_thumbs, "correction": check_correction,
                                               "comment": clean_comment}

    def validate(*values: Any) -> list[dict[str, Any]]:
        return validation_results([functools.partial(checks.get(name, lambda value: None), value)
                                   for name, value in zip(parameters, values)])

    return validate


def save_feedback(ctx: AppContext, request: gr.Request | None, output_id: Any, thumbs: Any = None,
                  correction: Any = None, comment: Any = None) -> Any:
    """Save the caller's feedback on an output; the store's ``SavedFeedback`` (``.message``: "Saved #N").

    The annotator is the login name, else the anonymous id of the caller's session. ``correction`` is
    the task's form (text, list of labels, ratings dict) or JSON text of it. Raises the store's readable
    errors: unknown or expired output, a bad rating, correction or comment, nothing to save.
    """
    ctx.recorder.wait(output_id)  # recorded in the background: a quick click may come first
    store = ctx.store
    annotator = ctx.annotator_of(request)
    if isinstance(correction, str) and correction.lstrip()[:1] in ("[", "{"):
        correction = parse_correction(store.get_output(output_id).task, correction)
    saved = store.add_feedback(output_id, annotator=annotator, thumbs=parse_thumbs(thumbs), correction=correction,
                               comment=comment)
    ctx.ops.metrics.recorded("feedback")
    return saved


def feedback_api(ctx: AppContext) -> None:
    """Register ``/feedback`` in the current Blocks, in a concurrency group of its own."""

    def feedback(output_id: str, thumbs: str | int | None = None,
                 correction: str | list[str] | dict | None = None, comment: str | None = None,
                 request: gr.Request = None) -> tuple[str, int]:
        """Save feedback on a result. output_id: from the result's details. thumbs: "up" or "down" (or 1 / -1).
        correction: the corrected caption / answer / transcript; for zero-shot the right labels (a list, JSON
        list or "a, b"); for text-to-image {"image_ratings": [1-5 or null per image], "preferred": index or
        null} (or its JSON). comment: free text. Returns the message ("Saved #12") and the record id; saving
        again (same output, same login or session) updates the same record."""
        saved = save_feedback(ctx, request, output_id, thumbs, correction, comment)
        return saved.message, saved.id

    validated_api(readable_errors(feedback), feedback_validator(["output_id", "thumbs", "correction", "comment"]),
                  api_name="feedback", concurrency_id=FEEDBACK_QUEUE, concurrency_limit=FEEDBACK_CONCURRENCY)


# --- corrections: one widget per task --------------------------------------------------------------


class Correction:
    """The correction widgets of one task: built under the output, filled from each result (the
    ``details`` dict), read back on save (None: nothing was corrected)."""

    components: list[gr.components.Component]

    def fill(self, result: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def read(self, result: dict[str, Any], values: list[Any]) -> Any:
        raise NotImplementedError


class TextCorrection(Correction):
    """The model's text, pre-filled and edited in place; unchanged text is no correction."""

    def __init__(self, field: str, label: str, lines: int = 2):
        self.field = field
        self.components = [gr.Textbox("", label=label, lines=lines, interactive=True,
                                      info="Pre-filled with the model's output: edit it, then save.")]

    def fill(self, result: dict[str, Any]) -> list[Any]:
        return [result.get(self.field) or ""]

    def read(self, result: dict[str, Any], values: list[Any]) -> Any:
        text = values[0] if isinstance(values[0], str) else ""
        return None if text.strip() == (result.get(self.field) or "").strip() else text


class LabelsCorrection(Correction):
    """The right label(s), chosen among the labels offered or typed. It starts empty, so that what is
    saved is exactly what the person chose; the line under it says what that is before they save."""

    NONE_CHOSEN = "*No label chosen: no label correction will be saved.*"

    def __init__(self) -> None:
        self.components = [gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                       label="Right label(s)", interactive=True,
                                       info="Choose the right label(s) among those offered, or type another and "
                                            "press Enter. Only what you choose is saved.")]
        self.preview = gr.Markdown(self.NONE_CHOSEN, elem_classes="mmdemo-labels-preview")
        self.components[0].change(self.describe, self.components, [self.preview], queue=False,
                                  show_progress="hidden", api_visibility="private")

    @staticmethod
    def offered(result: dict[str, Any]) -> list[str]:
        return [item["label"] for item in result.get("labels") or []]

    @staticmethod
    def chosen(value: Any) -> list[str]:
        """The labels picked or typed, in order (blank ones left out)."""
        picked = [value] if isinstance(value, str) else list(value or [])
        return [label for label in picked if isinstance(label, str) and label.strip()]

    def describe(self, value: Any) -> str:
        """The "will be saved" line for the labels chosen so far."""
        labels = self.chosen(value)
        if not labels:
            return self.NONE_CHOSEN
        return "**Will be saved as the right label(s):** " + ", ".join(f"`{label}`" for label in labels)

    def fill(self, result: dict[str, Any]) -> list[Any]:
        return [gr.Dropdown(choices=self.offered(result), value=[])]

    def read(self, result: dict[str, Any], values: list[Any]) -> Any:
        return self.chosen(values[0]) or None


class ImageRatings(Correction):
    """A 1-5 rating per generated image and, when there are several, the preferred one."""

    def __init__(self) -> None:
        with gr.Row():
            self.ratings = [gr.Radio([1, 2, 3, 4, 5], value=None, label=f"Image {i + 1}: 1 (bad) to 5 (good)",
                                     visible=False, min_width=200) for i in range(MAX_IMAGES)]
        self.preferred = gr.Radio([], value=None, label="Preferred image", visible=False)
        self.components = [*self.ratings, self.preferred]

    def fill(self, result: dict[str, Any]) -> list[Any]:
        count = len(result.get("images") or [])
        return [*(gr.Radio(value=None, visible=i < count) for i in range(MAX_IMAGES)),
                gr.Radio(choices=[(f"Image {i + 1}", i) for i in range(count)], value=None, visible=count > 1)]

    def read(self, result: dict[str, Any], values: list[Any]) -> Any:
        count = len(result.get("images") or [])
        ratings, preferred = values[:count], values[-1]
        if preferred is None and all(rating is None for rating in ratings):
            return None
        return {"image_ratings": ratings if any(r is not None for r in ratings) else None, "preferred": preferred}


def correction_for(task: str) -> Correction:
    """Build the correction widgets ``task`` needs (inside the current Blocks): its tab module's
    ``correction()`` (the tab named by the task's descriptor)."""
    spec = task_spec(task)
    if spec.tab is None:
        raise ValueError(f"Task {spec.id} has no tab, so no correction widgets.")
    return resolve(spec.tab).correction()


# --- the row -----------------------------------------------------------------------------------------


@dataclass
class FeedbackRow:
    """Thumbs, the task's correction, a comment, Save and a status line, for the result shown above.

    The thumbs buttons save at once (with the correction and comment as they stand); Save saves the
    correction and comment. Either way the status line says "Saved #N" or why nothing was saved.
    """

    ctx: AppContext
    box: gr.Column
    up: gr.Button
    down: gr.Button
    correction: Correction
    comment: gr.Textbox
    save: gr.Button
    status: gr.Markdown
    details: gr.JSON | None = None

    def connect(self, details: gr.JSON) -> None:
        """Wire the buttons; ``details`` holds the result (and its ``output_id``) they save against."""
        self.details = details
        inputs = {details, *self.correction.components, self.comment}
        for button, thumbs in ((self.up, 1), (self.down, -1), (self.save, None)):
            button.click(self.handler(thumbs), inputs, [self.status, self.up, self.down], queue=False,
                         show_progress="minimal", api_visibility="private")

    def follow(self, event: Any) -> None:
        """After each result of ``event``: show the row, filled for that result."""
        outputs = [self.box, *self.correction.components, self.comment, self.status, self.up, self.down]
        event.success(self.fill, [self.details], outputs, queue=False, show_progress="hidden", api_visibility="private")

    def fill(self, result: dict[str, Any] | None) -> list[Any]:
        result = result or {}
        return [gr.Column(visible=True), *self.correction.fill(result), "",
                "" if result.get("output_id") else UNAVAILABLE, *self.thumbs_shown(None)]

    @staticmethod
    def thumbs_shown(thumbs: int | None) -> tuple[gr.Button, gr.Button]:
        """The up / down buttons, the saved one highlighted."""
        return (gr.Button(variant="primary" if thumbs == 1 else "secondary"),
                gr.Button(variant="primary" if thumbs == -1 else "secondary"))

    def handler(self, thumbs: int | None) -> Any:
        @answered_in(self.status, "Not saved")  # a refusal: said in the status line, the thumbs as they were
        def save(values: dict[gr.components.Component, Any], request: gr.Request) -> tuple[Any, ...]:
            result = values[self.details] or {}
            if not result.get("output_id"):
                return "**Not saved:** this result was not recorded, so it cannot be rated.", gr.skip(), gr.skip()
            correction = self.correction.read(result, [values[c] for c in self.correction.components])
            saved = save_feedback(self.ctx, request, result["output_id"], thumbs, correction, values[self.comment])
            message = f"✓ **{saved.message}**" + ("" if saved.created else " (updated)")
            return (message, *self.thumbs_shown(thumbs)) if thumbs else (message, gr.skip(), gr.skip())

        return save


def feedback_row(ctx: AppContext, task: str) -> FeedbackRow:
    """The feedback row for ``task``, hidden until a result is shown; wire it with ``connect``."""
    with gr.Column(visible=False, elem_classes="mmdemo-feedback") as box:
        gr.Markdown(INTRO)
        with gr.Row():
            up = gr.Button("Thumbs up", size="sm", min_width=100)
            down = gr.Button("Thumbs down", size="sm", min_width=100)
        correction = correction_for(task)
        comment = gr.Textbox("", label="Comment (optional)", lines=1)
        save = gr.Button("Save feedback", size="sm")
        status = gr.Markdown(elem_classes="mmdemo-feedback-status")
    return FeedbackRow(ctx, box, up, down, correction, comment, save, status)
