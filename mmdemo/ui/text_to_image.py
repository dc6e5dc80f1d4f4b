"""Create tab (text-to-image): a prompt and settings -> a gallery of PNGs (with their settings in the
PNG metadata), each image's seed (reusable: image i of a request is made with seed + i), a progress bar
per denoising step and an Interrupt button. API: ``/text_to_image``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..media import save_images
from ..tasks.spec import task_spec
from .common import (AppContext, connect, default_model, examples, model_picker, output_area, results_column,
                     standalone)
from .feedback import Correction, ImageRatings

TASK = "text-to-image"
TITLE = task_spec(TASK).title
MAX_SEED = 2**32 - 1
FALLBACK_DEFAULTS = {"steps": 25, "guidance": 7.0, "width": 512, "height": 512}


def request(prompt: str, negative_prompt: str, model: str, steps: int, guidance: float, width: int, height: int,
            num_images: int, seed: int | None, randomize_seed: bool) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/text_to_image``, in order; with ``randomize_seed`` (or no seed) a random seed is
    drawn and returned."""
    return model, dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                       width=width, height=height, num_images=num_images,
                       seed=None if randomize_seed else seed)


def model_defaults(ctx: AppContext, model_id: str | None) -> dict[str, Any]:
    spec = ctx.registry.catalog.get(model_id) if model_id in ctx.registry.catalog else None
    return {**FALLBACK_DEFAULTS, **(dict(spec.defaults) if spec else {})}


def build(ctx: AppContext) -> SimpleNamespace:
    def present(result: dict[str, Any]) -> tuple[list[tuple[str, str]], int]:
        metadata = {**result["settings"], "model": result["model"]["id"]}
        paths = save_images(result["images"], ctx.output_path(f"mmdemo-{result['seed']}"), metadata, result["seeds"])
        result["images"] = [Path(path).name for path in paths]  # the details show names, not pixels
        for warning in result["warnings"]:  # e.g. a prompt longer than the text encoder reads
            gr.Warning(warning)
        return [(path, f"seed {seed}") for path, seed in zip(paths, result["seeds"])], result["seed"]

    with gr.Row(equal_height=False):
        with gr.Column():
            prompt = gr.Textbox("", label="Prompt", lines=2, placeholder="an astronaut riding a horse, oil painting")
            negative_prompt = gr.Textbox("", label="Negative prompt (what to avoid)", placeholder="blurry, text")
            model, note = model_picker(ctx, TASK)
            first = model_defaults(ctx, default_model(ctx, TASK))
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                randomize_seed = gr.Checkbox(True, label="Random seed")
            with gr.Accordion("Advanced settings", open=False):
                steps = gr.Slider(1, 100, value=first["steps"], step=1, precision=0, label="Denoising steps")
                guidance = gr.Slider(0.0, 20.0, value=first["guidance"], step=0.5, label="Guidance scale")
                with gr.Row():
                    width = gr.Slider(64, 1536, value=first["width"], step=8, precision=0, label="Width")
                    height = gr.Slider(64, 1536, value=first["height"], step=8, precision=0, label="Height")
                num_images = gr.Slider(1, 4, value=1, step=1, precision=0, label="Number of images")
            with gr.Row():
                button = gr.Button("Create", variant="primary", scale=3)
                interrupt = gr.Button("Interrupt", variant="stop", scale=1)
        with results_column() as results:
            gallery = gr.Gallery(label="Images", columns=2, height=420,
                                 buttons=["download", "fullscreen"], interactive=False, format="png")
            with gr.Row():
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False,
                                      info="Of the image selected in the gallery (the first by default)")
                reuse = gr.Button("Reuse this seed", size="sm")
            area = output_area(ctx, TASK, results)
    examples([["an astronaut riding a horse, oil painting", ""],
              ["a cozy cabin in snowy mountains at night, digital art", "blurry"],
              ["a cup of coffee on a wooden table, photograph", ""]], inputs=[prompt, negative_prompt])

    def settings_of(model_id: str) -> tuple[Any, ...]:
        defaults = model_defaults(ctx, model_id)
        return defaults["steps"], defaults["guidance"], defaults["width"], defaults["height"]

    model.change(settings_of, model, [steps, guidance, width, height], queue=False, show_progress="hidden",
                 api_visibility="private")
    # A seed typed by the person is meant to be used: untick "Random seed" (reuse sets both itself).
    seed.input(lambda: False, None, [randomize_seed], queue=False, show_progress="hidden", api_visibility="private")
    gallery.select(seed_of_selected, area.details, [seed_used], queue=False, show_progress="hidden",
                   api_visibility="private")
    reuse.click(lambda used: (used, False) if used is not None else (gr.skip(), gr.skip()), seed_used,
                [seed, randomize_seed], queue=False, show_progress="hidden", api_visibility="private")
    inputs = [prompt, negative_prompt, model, steps, guidance, width, height, num_images, seed, randomize_seed]
    event = connect(ctx, task=TASK, button=button, request=request, inputs=inputs, present=present,
                    outputs=[gallery, seed_used], area=area, api_name=task_spec(TASK).api_name, model=model, note=note,
                    media=None, text="prompt", step_progress=True, triggers=[prompt.submit], interrupt=interrupt)
    return SimpleNamespace(prompt=prompt, model=model, seed=seed, randomize_seed=randomize_seed, button=button,
                           interrupt=interrupt, gallery=gallery, seed_used=seed_used, reuse=reuse, area=area,
                           event=event)


def seed_of_selected(details: dict[str, Any] | None, selected: gr.SelectData) -> Any:
    """The seed of the gallery image that was selected, read from the result's ``seeds``."""
    seeds = (details or {}).get("seeds") or []
    return seeds[selected.index] if isinstance(selected.index, int) and selected.index < len(seeds) else gr.skip()


def correction() -> Correction:
    """The correction widgets under a result (and in Annotate)."""
    return ImageRatings()


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
