"""One place per task: the TaskSpec registry, and every layer reading its tasks from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mmdemo.errors import UnknownTaskError
from mmdemo.tasks import task_catalog, tiny_builders
from mmdemo.tasks.caption import CaptionSchema, CaptionTask
from mmdemo.tasks.spec import TaskSpec, register_task, resolve, task_spec, task_specs, unregister_task

ROOT = Path(__file__).resolve().parents[1]


def test_every_task_is_described_completely():
    specs = task_specs()
    assert len({spec.id for spec in specs}) == len(specs) >= 5
    builders = tiny_builders()
    for spec in specs:
        assert spec.runner.task == spec.id and spec.schema.task == spec.id
        assert spec.models and spec.tiny_models, spec.id  # runs from the Hub and offline
        for model in (*spec.models, *spec.tiny_models):
            assert model.task == spec.id and model.kind in spec.kinds
        for model in spec.tiny_models:
            assert model.source_location in builders, model.id
        tab = resolve(spec.tab)
        assert callable(tab.build) and callable(tab.correction), spec.tab
        if spec.finetune:
            assert resolve(spec.finetune)().task == spec.id


def test_names_and_aliases_find_the_task():
    assert task_spec("caption").id == task_spec("image-to-text").id == "image-to-text"
    assert task_spec("asr") is task_spec("transcribe") is task_spec("automatic-speech-recognition")
    with pytest.raises(UnknownTaskError, match="Tasks: image-to-text"):
        task_spec("image-segmentation")


class ShortCaptionTask(CaptionTask):
    task = "short-image-to-text"


class ShortCaptionSchema(CaptionSchema):
    task = "short-image-to-text"


def short_caption_spec(aliases: tuple[str, ...] = ("short",)) -> TaskSpec:
    """A seventh task, as a plugin would add it: BLIP captions under another task id."""
    tiny = task_spec("caption").tiny_models[0]
    return TaskSpec(id="short-image-to-text", title="Short caption", aliases=aliases, runner=ShortCaptionTask(),
                    schema=ShortCaptionSchema(), kinds={"blip": "transformers"},
                    tiny_models=(dataclasses.replace(tiny, id="tiny-short", task="short-image-to-text"),),
                    tab="mmdemo.ui.caption")


def test_a_taken_id_or_alias_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_task(task_spec("image-to-text"))
    with pytest.raises(ValueError, match="vqa"):
        register_task(short_caption_spec(aliases=("short", "vqa")))
    assert task_spec("vqa").id == "visual-question-answering"  # the refused spec changed nothing
    with pytest.raises(UnknownTaskError):
        task_spec("short")


def test_a_registered_task_reaches_the_catalog_and_the_cli():
    """A task added at run time (as a plugin would) is in the catalog, the CLI and the task listing."""
    from mmdemo.cli import build_parser

    spec = register_task(short_caption_spec())
    try:
        assert spec in task_specs()
        assert [m.id for m in task_catalog("tiny").for_task("short-image-to-text")] == ["tiny-short"]
        args = build_parser().parse_args(["predict", "short", "--max-new-tokens", "3", "--input", "x.jpg"])
        assert (args.task, args.max_new_tokens) == ("short", 3)
    finally:
        unregister_task("short-image-to-text")
    assert spec not in task_specs()


def test_predict_options_come_from_the_request():
    from mmdemo.cli import build_parser

    args = build_parser().parse_args(["predict", "classify", "--labels", "cat, dog", "--multi-label",
                                      "--input", "cat.jpg"])
    assert (args.labels, args.multi_label, args.template) == ("cat, dog", True, None)
    with pytest.raises(SystemExit):  # a caption option is not a zero-shot one
        build_parser().parse_args(["predict", "classify", "--prefix", "a"])


def test_importing_the_store_imports_no_task_module_and_no_torch():
    code = ("import sys; import mmdemo.feedback.store, mmdemo.feedback.export; "
            "bad = [m for m in sys.modules if m in ('torch', 'gradio', 'transformers') or "
            "m in ('mmdemo.tasks.caption', 'mmdemo.tasks.vqa', 'mmdemo.tasks.zero_shot', 'mmdemo.tasks.speech', "
            "'mmdemo.tasks.text_to_image')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
