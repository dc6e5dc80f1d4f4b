"""One place per task: the TaskSpec registry, and every layer reading its tasks from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mmdemo.errors import UnknownTaskError
from mmdemo.finetune import UnsupportedBaseError
from mmdemo.finetune.caption import CaptionAdapter
from mmdemo.finetune.evaluate import (
    LabelledQuestion,
    TaskEvaluation,
    before_after,
    evaluation_for,
    format_table,
    task_evaluations,
)
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


# --- evaluation: descriptor -> fine-tuning adapter -> evaluation -------------------------------------------


def test_each_tasks_evaluation_is_found_through_its_descriptor():
    found = task_evaluations()
    for spec in task_specs():
        evaluation = resolve(spec.finetune)().evaluation if spec.finetune else None
        if evaluation is None:
            assert spec.id not in found
            with pytest.raises(UnsupportedBaseError, match=f"Evaluation is not available for {spec.id} yet"):
                evaluation_for(spec.id)
            continue
        assert isinstance(evaluation, TaskEvaluation) and evaluation.task == spec.id
        assert evaluation_for(spec.id) is found[spec.id] is evaluation
    headlines = {task: evaluation.metrics[0][0] for task, evaluation in found.items()}
    assert headlines == {"image-to-text": "BLEU-4", "visual-question-answering": "VQA accuracy",
                         "text-to-image": "CLIP score", "zero-shot-image-classification": "top-1 accuracy",
                         "automatic-speech-recognition": "WER", "zero-shot-object-detection": "mAP@0.5"}


class ExactCaptionEvaluation(TaskEvaluation):
    """A plugin task's metric: the share of captions that are exactly the label."""

    task = "short-image-to-text"
    metrics = (("exact match", "exact", "questions"),)
    export_columns = ("image", "text")

    def examples_from_rows(self, rows, *, split_groups):
        raise NotImplementedError

    def example_from_campaign(self, item, campaign):
        raise NotImplementedError

    def accepted_answer(self, output):
        return output["text"]

    def task_inputs(self, example):
        return {"image": example.image}

    def prediction(self, result):
        return result["text"]

    def summarise(self, scored):
        hits = [float(caption == example.answers[0]) for example, caption in scored]
        return {"exact": sum(hits) / len(hits) if hits else None, "questions": len(hits)}


class ShortCaptionAdapter(CaptionAdapter):
    task = "short-image-to-text"
    evaluation = ExactCaptionEvaluation()


def test_a_plugin_tasks_evaluation_is_used_through_its_descriptor():
    """A task added at run time with an adapter that has an evaluation: ``evaluation_for``, the scoring loop
    and the before/after table all use its metric, with no list of tasks to edit."""
    spec = register_task(dataclasses.replace(short_caption_spec(), finetune="test_task_spec:ShortCaptionAdapter"))
    try:
        evaluation = evaluation_for("short-image-to-text")
        assert evaluation.metrics == (("exact match", "exact", "questions"),)
        examples = [LabelledQuestion(None, "", ("a cat",), group="accepted"),
                    LabelledQuestion(None, "", ("a dog",), group="corrected"),
                    LabelledQuestion(None, "", ("a car",), group="corrected")]
        scores = evaluation.score(lambda example: "a cat" if example.answers != ("a car",) else "a car", examples)
        assert scores == {"exact": 2 / 3, "questions": 3, "accepted": {"exact": 1.0, "questions": 1},
                          "corrected": {"exact": 0.5, "questions": 2}}
        metrics = {"base": {"id": "tiny-short"}, "evaluation": {"data": {"kind": "validation split", "questions": 3},
                                                                "base": scores, "new": scores}}
        table = before_after(metrics, "short-ours", spec.id)
        assert table["headers"] == ["model", "exact match", "accepted rows", "corrected rows"]
        assert table["rows"][0] == ["tiny-short (base)", "0.667 (3)", "1.000 (1)", "0.500 (2)"]
        assert format_table({"tiny-short": scores}, metrics["evaluation"]["data"], spec.id).splitlines()[0].split() == [
            "model", "exact", "match", "accepted", "rows", "corrected", "rows"]
    finally:
        unregister_task("short-image-to-text")
