"""Ask tab (visual question answering): an image and a question -> the answer and, where the model
scores its answers (ViLT), the top answers with their scores. API: ``/vqa``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..tasks.spec import task_spec
from .common import (AppContext, asset, connect, examples, media_source, model_picker, output_area,
                     results_column, standalone)
from .feedback import Correction, TextCorrection

TASK = "visual-question-answering"
TITLE = task_spec(TASK).title


def request(image: Any, question: str, model: str, top_k: int, max_new_tokens: int) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/vqa``, in order; ``image`` is a file."""
    return model, dict(image=media_source(image, "image"), question=question, top_k=top_k,
                       max_new_tokens=max_new_tokens)


def present(result: dict[str, Any]) -> tuple[str, dict[str, float] | None]:
    # Generative models (BLIP) give no scores: the list stays empty (and hidden) rather than faked.
    return result["answer"], {item["answer"]: item["score"] for item in result.get("answers") or []} or None


def build(ctx: AppContext) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                             image_mode=None, height=320, elem_classes="mmdemo-input-image")
            question = gr.Textbox("", label="Question", placeholder="What is in the picture?")
            model, note = model_picker(ctx, TASK)
            with gr.Accordion("Advanced settings", open=False):
                top_k = gr.Slider(1, 10, value=5, step=1, precision=0, label="Answers to list (scoring models)")
                max_new_tokens = gr.Slider(1, 50, value=20, step=1, precision=0,
                                           label="Maximum answer length (generating models)")
            button = gr.Button("Ask", variant="primary")
        with results_column() as results:
            answer = gr.Textbox("", label="Answer", interactive=False, buttons=["copy"])
            # No heading: the best answer is in the Answer box already.
            top_answers = gr.Label(label="Top answers", show_heading=False, visible=False)
            area = output_area(ctx, TASK, results)
    examples([[asset("cat.jpg"), "What animal is this?"], [asset("coffee.jpg"), "What is in the cup?"],
              [asset("rocket.jpg"), "Is it day or night?"]], inputs=[image, question])
    event = connect(ctx, task=TASK, button=button, request=request,
                    inputs=[image, question, model, top_k, max_new_tokens], present=present,
                    outputs=[answer, top_answers], area=area, api_name=task_spec(TASK).api_name, model=model, note=note,
                    media="image", text="question", triggers=[question.submit])
    # Shown for models that score their answers (the API's output stays a plain value).
    event.success(lambda details: gr.Label(visible=bool((details or {}).get("answers"))), area.details,
                  [top_answers], queue=False, show_progress="hidden", api_visibility="private")
    return SimpleNamespace(image=image, question=question, model=model, button=button, answer=answer,
                           top_answers=top_answers, area=area, event=event)


def correction() -> Correction:
    """The correction widgets under a result (and in Annotate)."""
    return TextCorrection("answer", "Right answer", lines=1)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
