"""Classify tab (zero-shot): an image and labels -> a score per label, sorted. API: ``/zero_shot``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..errors import InvalidInputError
from ..tasks.zero_shot import parse_labels
from ..tasks.spec import task_spec
from .common import (AppContext, asset, connect, examples, media_source, model_picker, output_area,
                     results_column, standalone)
from .feedback import Correction, LabelsCorrection

TASK = "zero-shot-image-classification"
TITLE = task_spec(TASK).title
DEFAULT_TEMPLATE = "a photo of a {}."
ONE_LABEL_NOTE = ("*With one label the score is always 100%, whatever the image: a softmax only compares labels "
                  "with each other. Add the other things it could be, or tick Multi-label with a SigLIP model for "
                  "an independent score.*")


def request(image: Any, labels: str, model: str, template: str, multi_label: bool) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/zero_shot``, in order; ``labels`` separated by commas or new lines."""
    return model, dict(image=media_source(image, "image"), labels=labels, template=template, multi_label=multi_label)


def present(result: dict[str, Any]) -> tuple[dict[str, float]]:
    return ({item["label"]: item["score"] for item in result["labels"]},)


def labels_note(labels: str, multi_label: bool) -> str:
    """A word under the labels when their scores would mean nothing (one label, single-label scoring)."""
    try:
        one_label = len(parse_labels(labels)) == 1
    except InvalidInputError:  # no labels yet, or too many: the request's own message says it
        return ""
    return ONE_LABEL_NOTE if one_label and not multi_label else ""


def build(ctx: AppContext) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                             image_mode=None, height=320, elem_classes="mmdemo-input-image")
            labels = gr.Textbox("", label="Labels (separated by commas or new lines)", lines=3,
                                placeholder="cat, dog, cup of coffee")
            note_on_labels = gr.Markdown(elem_classes="mmdemo-note")
            model, note = model_picker(ctx, TASK)
            with gr.Accordion("Advanced settings", open=False):
                template = gr.Textbox(DEFAULT_TEMPLATE, label="Template ({} is replaced by each label)")
                multi_label = gr.Checkbox(False, label="Multi-label: an independent score per label "
                                                       "(needs a sigmoid model such as SigLIP)")
            button = gr.Button("Classify", variant="primary")
        with results_column() as results:
            scores = gr.Label(label="Scores", num_top_classes=None)
            area = output_area(ctx, TASK, results)
    examples([[asset("cat.jpg"), "cat, dog, cup of coffee, rocket"],
              [asset("coffee.jpg"), "coffee\ntea\nsoup"],
              [asset("astronaut.jpg"), "astronaut, scientist, pilot, farmer"]], inputs=[image, labels])
    gr.on([labels.change, multi_label.change], labels_note, [labels, multi_label], [note_on_labels], queue=False,
          show_progress="hidden", api_visibility="private")
    event = connect(ctx, task=TASK, button=button, request=request,
                    inputs=[image, labels, model, template, multi_label], present=present, outputs=[scores],
                    area=area, api_name=task_spec(TASK).api_name, model=model, note=note, media="image", text="labels",
                    batch=True)
    return SimpleNamespace(image=image, labels=labels, labels_note=note_on_labels, model=model, button=button,
                           scores=scores, area=area, event=event)


def correction() -> Correction:
    """The correction widgets under a result (and in Annotate)."""
    return LabelsCorrection()


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
