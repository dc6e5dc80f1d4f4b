"""Classify tab (zero-shot): an image and labels -> a score per label, sorted. API: ``/zero_shot``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from .common import AppContext, asset, connect, examples, media_source, model_picker, output_area, standalone

TASK = "zero-shot-image-classification"
TITLE = "Classify"
DEFAULT_TEMPLATE = "a photo of a {}."


def request(image: Any, labels: str, model: str, template: str, multi_label: bool) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/zero_shot``, in order; ``labels`` separated by commas or new lines."""
    return model, dict(image=media_source(image, "image"), labels=labels, template=template, multi_label=multi_label)


def present(result: dict[str, Any]) -> tuple[dict[str, float]]:
    return ({item["label"]: item["score"] for item in result["labels"]},)


def build(ctx: AppContext) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                             image_mode=None, height=320)
            labels = gr.Textbox("", label="Labels (separated by commas or new lines)", lines=3,
                                placeholder="cat, dog, cup of coffee")
            model, note = model_picker(ctx, TASK)
            with gr.Accordion("Advanced settings", open=False):
                template = gr.Textbox(DEFAULT_TEMPLATE, label="Template ({} is replaced by each label)")
                multi_label = gr.Checkbox(False, label="Multi-label: an independent score per label "
                                                       "(needs a sigmoid model such as SigLIP)")
            button = gr.Button("Classify", variant="primary")
        with gr.Column():
            scores = gr.Label(label="Scores", num_top_classes=None)
            area = output_area(ctx, TASK)
    examples([[asset("cat.jpg"), "cat, dog, cup of coffee, rocket"],
              [asset("coffee.jpg"), "coffee\ntea\nsoup"],
              [asset("astronaut.jpg"), "astronaut, scientist, pilot, farmer"]], inputs=[image, labels])
    event = connect(ctx, task=TASK, button=button, request=request,
                    inputs=[image, labels, model, template, multi_label], present=present, outputs=[scores],
                    area=area, api_name="zero_shot", model=model, note=note, media="image", text="labels",
                    batch=True)
    return SimpleNamespace(image=image, labels=labels, model=model, button=button, scores=scores, area=area,
                           event=event)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
