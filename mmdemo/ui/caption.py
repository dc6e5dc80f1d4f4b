"""Caption tab: an image (upload, webcam or paste) and an optional prefix -> a caption. API: ``/caption``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..tasks.spec import task_spec
from .common import (AppContext, asset, connect, examples, media_source, model_picker, output_area,
                     results_column, standalone)
from .feedback import Correction, TextCorrection

TASK = "image-to-text"
TITLE = task_spec(TASK).title


def request(image: Any, prefix: str, model: str, max_new_tokens: int, num_beams: int, do_sample: bool,
            temperature: float, top_p: float) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/caption``, in order; ``image`` is a file."""
    return model, dict(image=media_source(image, "image"), prefix=prefix, max_new_tokens=max_new_tokens,
                       num_beams=num_beams, do_sample=do_sample, temperature=temperature, top_p=top_p)


def present(result: dict[str, Any]) -> tuple[str]:
    return (result["text"],)


def build(ctx: AppContext) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                             image_mode=None, height=320, elem_classes="mmdemo-input-image")
            prefix = gr.Textbox("", label="Start of the caption (optional)", placeholder="a photograph of")
            model, note = model_picker(ctx, TASK)
            with gr.Accordion("Advanced settings", open=False):
                max_new_tokens = gr.Slider(1, 100, value=30, step=1, precision=0, label="Maximum length (tokens)")
                num_beams = gr.Slider(1, 8, value=1, step=1, precision=0, label="Beams (1: greedy)")
                do_sample = gr.Checkbox(False, label="Sample (more varied captions)")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (when sampling)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (when sampling)")
            button = gr.Button("Caption", variant="primary")
        with results_column() as results:
            caption = gr.Textbox("", label="Caption", lines=3, buttons=["copy"], interactive=False)
            area = output_area(ctx, TASK, results)
    examples([[asset("cat.jpg"), ""], [asset("coffee.jpg"), "a cup of"], [asset("astronaut.jpg"), ""],
              [asset("rocket.jpg"), ""]], inputs=[image, prefix])
    inputs = [image, prefix, model, max_new_tokens, num_beams, do_sample, temperature, top_p]
    event = connect(ctx, task=TASK, button=button, request=request, inputs=inputs, present=present,
                    outputs=[caption], area=area, api_name=task_spec(TASK).api_name, model=model, note=note,
                    media="image", text="prefix", batch=True, triggers=[prefix.submit])
    return SimpleNamespace(image=image, prefix=prefix, model=model, button=button, caption=caption,
                           area=area, event=event)


def correction() -> Correction:
    """The correction widgets under a result (and in Annotate)."""
    return TextCorrection("text", "Correct caption")


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
