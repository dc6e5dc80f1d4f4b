"""Is the new model better? Task metrics on labelled data, for a fine-tuning job's before/after table
and for ``mmdemo evaluate``.

Each task that has a metric has one :class:`TaskEvaluation` (its examples, what the model is asked, the
part of its result that is scored, the metric), living next to the task's fine-tuning adapter and reached
through it: ``TaskSpec.finetune`` -> ``FinetuneAdapter.evaluation`` (:func:`evaluation_for`). This module
keeps what every task shares: the scoring loop with its accepted / corrected groups, where the labels come
from, the tables and the before/after of a job.

Where the labels come from decides what the numbers mean:

* a held-out campaign labelled by people (``--eval-campaign``) or an exported dataset of other data
  (``--eval-dataset``): the base model did not pick these answers, so base and new compare fairly
  (unless the base pre-labelled the campaign and annotators accepted its suggestions: the report
  says how many labels were accepted suggestions, and of which model);
* the training data's own validation split: biased. Accepted (thumbs-up) rows copy the base's own
  answer (the base looks perfect on them), corrected rows are exactly where it was wrong (it looks
  hopeless), so the two are reported apart and the report says the comparison is biased.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from .adapters import finetune_adapters
from .errors import UnsupportedBaseError
from .labels import ACCEPTED, CORRECTED, CampaignInput, campaign_inputs

BIASED_NOTE = ("biased: only the training data's own validation split was available. The base model looks "
               "perfect on accepted rows (they copy its answer) and hopeless on corrected rows (chosen because "
               "it was wrong); evaluate on a held-out campaign or dataset (--eval-campaign, --eval-dataset).")


@dataclass(frozen=True)
class LabelledQuestion:
    """One image and question with every answer people gave (repeated once per person)."""

    image: Any                       # PIL image
    question: str
    answers: tuple[str, ...]
    group: str | None = None         # accepted / corrected (validation split only), else None
    suggested_by: str | None = None  # the model whose suggestion a person accepted, if one did
    output_ids: tuple[str, ...] = ()  # the recorded outputs the labels are about (campaigns)
    labels_offered: tuple[str, ...] = ()  # zero-shot: the labels the model chooses from
    template: str | None = None      # zero-shot: the record's template (None: the model's default)


# --- one task's evaluation ---------------------------------------------------------------------------------


class TaskEvaluation(ABC):
    """How one task is scored on labelled data: its examples (from exported rows, an exported dataset or a
    campaign), what the model is asked for each, the part of its result that is scored, and the metric.

    An example is any object with ``answers`` (the labels, one per person), ``group`` (accepted / corrected
    on a validation split, else None), ``suggested_by`` and ``output_ids`` (see :class:`LabelledQuestion`).
    """

    task: ClassVar[str]
    # (column title, result key, key of the count it is over) of each metric, headline first
    metrics: ClassVar[tuple[tuple[str, str, str], ...]]
    export_columns: ClassVar[tuple[str, ...]]  # the exported dataset columns the examples read
    media: ClassVar[str] = "image"             # what a campaign's input is called in messages

    @abstractmethod
    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[Any]:
        """Examples from exported rows (media undecoded); ``split_groups`` marks each accepted or corrected."""

    @abstractmethod
    def example_from_campaign(self, item: CampaignInput, campaign: str) -> Any:
        """The example of one campaign input, with every label people submitted for it."""

    @abstractmethod
    def accepted_answer(self, output: dict[str, Any]) -> Any:
        """The label of an accepted suggestion (a recorded output), as the export takes it."""

    @abstractmethod
    def task_inputs(self, example: Any) -> dict[str, Any]:
        """What the task is asked for ``example``: its media and the task's other inputs."""

    @abstractmethod
    def prediction(self, result: dict[str, Any]) -> Any:
        """The part of the task's result that is scored."""

    @abstractmethod
    def summarise(self, scored: list[tuple[Any, Any]]) -> dict[str, Any]:
        """The metrics of (example, prediction) pairs: a dict with every key :attr:`metrics` names."""

    def examples_from_export(self, path: Path) -> list[Any]:
        """Every row of both splits of an exported dataset folder (``mmdemo export --format datasets``)."""
        from .data import load_export

        data = load_export(Path(path), self.task, self.export_columns)
        rows = [row for split in (data.train, data.validation) for row in undecoded(split)]
        return self.examples_from_rows(rows, split_groups=False)

    def examples_from_campaign(self, store: Any, campaign: str) -> list[Any]:
        """The labels people submitted in an annotation campaign, one example per input
        (``suggested_by`` names the model whose suggestion someone accepted)."""
        return [self.example_from_campaign(item, campaign) for item in campaign_inputs(store, campaign, self)]

    def loaded_model_answers(self, spec: Any, bundle: Any, registry: Any = None) -> Callable[[Any], Any]:
        """Predictions from a model loaded here (``bundle``: the task's loaded form), as the app computes them;
        ``registry``: where a metric finds the models it scores with (text-to-image: a CLIP)."""
        from ..media import MediaLimits
        from ..tasks import get_task

        task = get_task(self.task)

        def answer(example: Any) -> Any:
            request = task.prepare({**spec.defaults, **self.task_inputs(example)}, MediaLimits(), spec)
            return self.prediction(task.predict(bundle, request))

        return answer

    def served_model_answers(self, registry: Any, model_id: str) -> Callable[[Any], Any]:
        """Predictions of a catalog model through the registry (``mmdemo.tasks.run``)."""
        from ..tasks import run

        return lambda example: self.prediction(run(registry, self.task, model_id, **self.task_inputs(example)))

    def score(self, answer: Callable[[Any], Any], examples: list[Any],
              predictions: list[Any] | None = None) -> dict[str, Any]:
        """The metrics of ``answer`` (example -> the model's prediction) over ``examples``, overall and per
        group (accepted / corrected); the predictions are appended to ``predictions`` if given."""
        scored = [(example, answer(example)) for example in examples]
        if predictions is not None:
            predictions.extend(prediction for _, prediction in scored)
        result = self.summarise(scored)
        for group in sorted({example.group for example in examples if example.group}):
            result[group] = self.summarise([pair for pair in scored if pair[0].group == group])
        return result


    def save_artifacts(self, folder: Path, examples: list[Any], predictions: dict[str, list[Any]]) -> dict[str, Any]:
        """Write what a person looks at beside the numbers (text-to-image: a grid of images) into a new model's
        ``folder``, from the base's and the new model's ``predictions`` ({"base": [...], "new": [...]});
        returns what metrics.json says about it (nothing by default)."""
        return {}


def task_evaluations() -> dict[str, TaskEvaluation]:
    """Every task that has a metric, with its evaluation (found through its descriptor's adapter)."""
    return {task: adapter.evaluation for task, adapter in finetune_adapters().items() if adapter.evaluation}


def evaluation_for(task: str) -> TaskEvaluation:
    """The evaluation of ``task``, or ``UnsupportedBaseError`` when the task has no metric yet."""
    evaluations = task_evaluations()
    try:
        return evaluations[task]
    except KeyError:
        raise UnsupportedBaseError(
            f"Evaluation is not available for {task} yet; tasks: {', '.join(evaluations)}.") from None


def has_metric(task: str) -> bool:
    """Whether ``task`` has an evaluation (its adapter's ``evaluation`` is set)."""
    return task in task_evaluations()


def undecoded(split: Any) -> Any:
    """``split`` with its image column as ``{bytes, path}`` (grouping hashes the bytes)."""
    from datasets import Image

    return split.cast_column("image", Image(decode=False)) if "image" in split.column_names else split


def grouped_rows(rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
                 label: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    """Exported rows (image bytes, merged_record_ids, corrected...) grouped by their image and ``key(row)``:
    ``{"row": the first row, "image": bytes, "labels": [..], "corrected": bool}``, each row's ``label(row)``
    repeated once per person who gave it (exact duplicates were merged by the export)."""
    groups: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        data = row["image"]["bytes"]
        group = groups.setdefault((hashlib.sha256(data).hexdigest(), key(row)),
                                  {"row": row, "image": data, "labels": [], "corrected": False})
        group["labels"] += [label(row)] * (1 + len(row.get("merged_record_ids") or []))
        group["corrected"] = group["corrected"] or bool(row.get("corrected"))
    return list(groups.values())


def group_of(corrected: bool, split_groups: bool) -> str | None:
    """A validation example's group (accepted / corrected); None when the groups are not split."""
    return (CORRECTED if corrected else ACCEPTED) if split_groups else None


def image_of(data: bytes) -> Any:
    """Exported or stored image bytes as an RGB PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


# --- shared by every task ----------------------------------------------------------------------------------


def describe_source(questions: list[Any], source: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json and ``mmdemo evaluate`` say about the labels: where from, how many, and
    whether they are biased (a validation split, or suggestions accepted from a model)."""
    accepted = Counter(q.suggested_by for q in questions if q.suggested_by)
    info = {**source, "questions": len(questions), "answers": sum(len(q.answers) for q in questions)}
    if source.get("kind") == "validation split":
        info["biased"], info["note"] = True, BIASED_NOTE
    elif accepted:
        info["biased"] = True
        info["accepted_suggestions"] = dict(accepted)
        info["note"] = ("biased towards " + ", ".join(sorted(accepted)) + ": some labels are suggestions of "
                        "that model that a person accepted.")
    else:
        info["biased"] = False
    return info


def format_table(results: dict[str, dict[str, Any]], source: dict[str, Any], task: str) -> str:
    """A plain-text table: one line per model, the task's metrics overall (and accepted / corrected apart)."""
    headers, rows = table_rows(results, task)
    width = max(len(row[0]) for row in [headers, *rows])
    widths = [max(14, len(title)) for title in headers[1:]]
    lines = [f"{row[0]:<{width}}" + "".join(f"  {cell:>{w}}" for cell, w in zip(row[1:], widths))
             for row in [headers, *rows]]
    lines.append(source_line(source))
    if source.get("note"):
        lines.append(f"note: {source['note']}")
    return "\n".join(lines)


def table_rows(results: dict[str, dict[str, Any]], task: str) -> tuple[list[str], list[list[str]]]:
    """The headers ("model", then the task's metrics overall and, when present, on accepted / corrected
    rows apart) and one row of cells per model (``"0.500 (4)"``: the score and the count it is over)."""
    metrics = evaluation_for(task).metrics
    groups = [g for g in (ACCEPTED, CORRECTED) if any(g in r for r in results.values())]
    columns = [(title, None, metric) for title, *metric in metrics]
    columns += [(f"{g} rows" if len(metrics) == 1 else f"{title}, {g}", g, metric)
                for g in groups for title, *metric in metrics]
    headers = ["model", *(title for title, _, _ in columns)]
    rows = [[name, *(_cell(result.get(g) if g else result, *metric) for _, g, metric in columns)]
            for name, result in results.items()]
    return headers, rows


def source_line(source: dict[str, Any]) -> str:
    """What the scores are over: ``on 12 questions (campaign-name)``."""
    where = source.get("campaign") or source.get("dataset") or source.get("kind", "")
    return f"on {source['questions']} questions ({where})"


def compared_models(metrics: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """A job's evaluation (its ``metrics.json``) as ``{"<base> (base)": scores, "<name> (new)": scores}``;
    empty when the job scored nothing (a task without a metric, or no labelled questions)."""
    evaluation = metrics.get("evaluation") or {}
    if "base" not in evaluation:
        return {}
    return {f"{metrics['base']['id']} (base)": evaluation["base"], f"{name} (new)": evaluation["new"]}


def before_after(metrics: dict[str, Any], name: str, task: str) -> dict[str, Any] | None:
    """A finished job's before/after table from its ``metrics.json``: ``{"headers", "rows", "source",
    "note"}`` (``note``: why the comparison is biased, or None); None when the job scored nothing."""
    results = compared_models(metrics, name)
    if not results or not has_metric(task):
        return None
    data = metrics["evaluation"]["data"]
    headers, rows = table_rows(results, task)
    return {"headers": headers, "rows": rows, "source": source_line(data), "note": data.get("note")}


def loss_curve(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's losses from its ``metrics.json``, one point per (epoch, split): ``{"epoch", "loss",
    "split"}`` with split "train" or "validation", epoch 0 being the base before training. A split
    without a loss (no validation rows) has no points."""
    epochs = [{"epoch": 0, **metrics.get("initial", {})}, *metrics.get("epochs", [])]
    return [{"epoch": entry["epoch"], "loss": entry[key], "split": split}
            for split, key in (("train", "train_loss"), ("validation", "val_loss"))
            for entry in epochs if entry.get(key) is not None]


def _cell(result: dict[str, Any] | None, key: str, count: str) -> str:
    if not result or result.get(key) is None:
        return "-"
    return f"{result[key]:.3f} ({result[count]})"


def average(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
