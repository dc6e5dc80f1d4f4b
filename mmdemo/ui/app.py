"""The whole app: a tab per registered task, Annotate and the Models panel over one registry, in one queue group, and the
``/feedback`` endpoint beside it."""

from __future__ import annotations

import gradio as gr

from ..tasks.spec import resolve, task_specs
from . import annotate, models_panel
from .compare import vote_api
from .common import AppContext, configure_queue
from .feedback import feedback_api

# gradio 6 takes theme and CSS at launch(). System fonts: the default theme would fetch web fonts
# from Google, and no request may leave the machine.
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
CSS = """
.mmdemo-footer { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
.mmdemo-note { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
.mmdemo-feedback { border-top: 1px solid var(--border-color-primary); padding-top: var(--spacing-lg); }
/* A result that no longer matches the inputs (they changed, or a new request runs): greyed out. */
.mmdemo-stale { opacity: 0.4; transition: opacity 0.15s; }
/* Example texts keep their line breaks (labels one per line). */
.table-wrap td.textbox .table { white-space: pre-line !important; }
/* The 1-5 rating of each generated image on one line, even with two images side by side. */
.mmdemo-feedback .row fieldset .wrap { flex-wrap: nowrap; gap: var(--spacing-sm); }
.mmdemo-feedback .row fieldset .wrap label { padding: var(--spacing-sm) var(--spacing-md); }
/* Phones: the inputs and the button come first, the introduction is left out. */
@media (max-width: 640px) {
  .mmdemo-intro { display: none; }
  .mmdemo-input-image { height: 150px !important; }
  .mmdemo-input-audio { height: 150px !important; min-height: 0 !important; }
  .mmdemo-input-audio * { min-height: 0 !important; }
}
"""


def theme() -> gr.themes.Base:
    return gr.themes.Default(primary_hue="indigo", font=SYSTEM_FONTS, font_mono=MONO_FONTS)


INTRO = ("Try multimodal models, one tab per task. Models load on first use; the line under each output says which model and device "
         "answered, and how long it took. Rate or correct a result under it: your feedback becomes fine-tuning "
         "data.")


def header(ctx: AppContext) -> None:
    """The title, the introduction (left out on phones) and, in the tiny profile, what its models are."""
    gr.Markdown("# mmdemo")
    gr.Markdown(INTRO, elem_classes="mmdemo-intro")
    if ctx.settings.profile == "tiny":
        gr.Markdown("**Tiny profile:** offline, randomly initialised models of the real architectures, for "
                    "testing. Their outputs are nonsense.")


def build_blocks(ctx: AppContext) -> gr.Blocks:
    """All tabs in one Blocks, its queue configured (bounded, shared model concurrency)."""
    with gr.Blocks(title="mmdemo", delete_cache=(3600, 3600)) as demo:
        header(ctx)
        with gr.Tabs():
            for spec in task_specs():  # one tab per registered task, then Annotate
                if spec.tab:
                    with gr.Tab(spec.title, id=spec.title.lower(), elem_id=f"tab-{spec.title.lower()}"):
                        resolve(spec.tab).build(ctx)
            with gr.Tab(annotate.TITLE, id="annotate", elem_id="tab-annotate"):
                annotate.build(ctx)
            with gr.Tab(models_panel.TITLE, id="models", elem_id="tab-models") as models_tab:
                panel = models_panel.build(ctx)
        models_tab.select(panel.refresh, None, [panel.info, panel.table], queue=False, show_progress="hidden",
                          api_visibility="private")
        feedback_api(ctx)
        vote_api(ctx)
        annotate.annotation_api(ctx)
    demo.mmdemo_context = ctx  # for tests and embedding apps: ctx.recorder.flush(), ctx.registry...
    return configure_queue(demo, ctx)
