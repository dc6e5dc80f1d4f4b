"""Transcribe tab (speech recognition): a recording or an audio file -> the transcript and, when asked,
timestamped segments. API: ``/transcribe``.

Requests waiting in the queue run as one batch: the transformers Whisper batches those with the same
settings; faster-whisper runs them one by one (each result's ``batch`` says which happened)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..tasks.spec import task_spec
from .common import (AppContext, asset, connect, examples, media_source, model_picker, output_area,
                     results_column, standalone)
from .feedback import Correction, TextCorrection

TASK = "automatic-speech-recognition"
TITLE = task_spec(TASK).title
# Whisper's commonest languages first; any other code can be typed in.
LANGUAGES = ["auto", "en", "de", "es", "fr", "it", "pt", "nl", "pl", "ru", "uk", "tr", "ar", "hi", "zh", "ja", "ko"]
SEGMENT_HEADERS = ["start (s)", "end (s)", "text"]


def request(audio: Any, model: str, language: str, translate: bool, timestamps: bool) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/transcribe``, in order; ``audio`` is a file, ``language`` a code or "auto"."""
    return model, dict(audio=media_source(audio, "audio"), language=language, translate=translate,
                       timestamps=timestamps)


def present(result: dict[str, Any]) -> tuple[str, list[list[Any]]]:
    return result["text"], [[chunk["start"], chunk["end"], chunk["text"]] for chunk in result.get("chunks", [])]


def build(ctx: AppContext) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            audio = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath",
                             elem_classes="mmdemo-input-audio")
            model, note = model_picker(ctx, TASK)
            with gr.Row():
                language = gr.Dropdown(LANGUAGES, value="auto", allow_custom_value=True,
                                       label="Language (auto: detect)")
                translate = gr.Checkbox(False, label="Translate into English")
                timestamps = gr.Checkbox(False, label="Timestamps")
            button = gr.Button("Transcribe", variant="primary")
        with results_column() as results:
            transcript = gr.Textbox("", label="Transcript", lines=5, interactive=False, buttons=["copy"])
            with gr.Accordion("Segments", open=True, visible=False) as segments_box:  # shown with Timestamps
                segments = gr.Dataframe(headers=SEGMENT_HEADERS, label="Segments", show_label=False,
                                        interactive=False, wrap=True)
            area = output_area(ctx, TASK, results)
    examples([[asset("speech.wav")]], inputs=[audio])
    timestamps.change(lambda shown: gr.Accordion(visible=shown), timestamps, [segments_box], queue=False,
                      show_progress="hidden", api_visibility="private")
    event = connect(ctx, task=TASK, button=button, request=request,
                    inputs=[audio, model, language, translate, timestamps], present=present,
                    outputs=[transcript, segments], area=area, api_name=task_spec(TASK).api_name, model=model, note=note,
                    media="audio", text="language", batch=True)
    return SimpleNamespace(audio=audio, model=model, button=button, transcript=transcript, segments=segments,
                           area=area, event=event)


def correction() -> Correction:
    """The correction widgets under a result (and in Annotate)."""
    return TextCorrection("text", "Correct transcript", lines=4)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
