"""Is the new model better? Task metrics on labelled data, for a fine-tuning job's before/after table
and for ``mmdemo evaluate``.

Where the labels come from decides what the numbers mean:

* a held-out campaign labelled by people (``--eval-campaign``) or an exported dataset of other data
  (``--eval-dataset``): the base model did not pick these answers, so base and new compare fairly
  (unless the base pre-labelled the campaign and annotators accepted its suggestions: the report
  says how many labels were accepted suggestions, and of which model);
* the training data's own validation split: biased. Accepted (thumbs-up) rows copy the base's own
  answer (the base looks perfect on them), corrected rows are exactly where it was wrong (it looks
  hopeless), so the two are reported apart and the report says the comparison is biased.

VQA accuracy is the standard VQA normalisation (lower case, punctuation and articles dropped, number
words as digits) and, when several people answered a question, ``min(#people who gave the answer / 3,
1)``; with one answer it is an exact match after normalisation.

Zero-shot classification: the model ranks the labels offered with the image (plus the right ones, if a
person typed a label that was not offered), through the record's template or the model's default.
Single-label images score top-1 accuracy; multi-label images (several right labels) score micro F1 of
the model's top k labels, k being the number of right labels. The right labels of an image several
people labelled are those at least half of them gave.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UnsupportedBaseError
from .labels import (  # noqa: F401 - callers read them here too
    ACCEPTED,
    ASR,
    CORRECTED,
    VQA,
    ZERO_SHOT,
    CampaignInput,
    campaign_inputs,
)

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


# --- VQA accuracy ------------------------------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normal form: ``"Two dogs."`` -> ``"2 dogs"``, ``"the Red"`` -> ``"red"``."""
    text = str(text).lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PERIOD.sub("", _PUNCTUATION.sub("", text))
    words = [_NUMBERS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Iterable[str]) -> float:
    """``min(#people who said it / 3, 1)`` when several people answered, else an exact match, both
    after :func:`normalize_answer`."""
    answers = [normalize_answer(answer) for answer in answers]
    said = sum(answer == normalize_answer(prediction) for answer in answers)
    if len(answers) > 1:
        return min(said / 3, 1.0)
    return float(said == 1)


# --- labelled data -------------------------------------------------------------------------------------


def group_vqa_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exported VQA rows (image bytes, question, answer, merged_record_ids, corrected) grouped by
    (image, question): ``{"image": bytes, "question", "answers": [..], "corrected": bool}``, each
    answer repeated once per person who gave it (exact duplicates were merged by the export)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        data = row["image"]["bytes"]
        key = (hashlib.sha256(data).hexdigest(), row["question"].strip())
        group = groups.setdefault(key, {"image": data, "question": row["question"], "answers": [],
                                        "corrected": False})
        group["answers"] += [row["answer"]] * (1 + len(row.get("merged_record_ids") or []))
        group["corrected"] = group["corrected"] or bool(row.get("corrected"))
    return list(groups.values())


def questions_from_rows(rows: Iterable[dict[str, Any]], *, split_groups: bool,
                        task: str = VQA) -> list[LabelledQuestion]:
    """:class:`LabelledQuestion` s from exported rows; ``split_groups`` marks each accepted or corrected."""
    from PIL import Image

    if task == ASR:
        return _speech().examples_from_rows(rows, split_groups=split_groups)
    if task == ZERO_SHOT:
        return labelled_images_from_rows(rows, split_groups=split_groups)
    found = []
    for group in group_vqa_rows(rows):
        image = Image.open(io.BytesIO(group["image"])).convert("RGB")
        kind = (CORRECTED if group["corrected"] else ACCEPTED) if split_groups else None
        found.append(LabelledQuestion(image, group["question"], tuple(group["answers"]), kind))
    return found


def undecoded(split: Any) -> Any:
    """``split`` with its image column as ``{bytes, path}`` (grouping hashes the bytes)."""
    from datasets import Image

    return split.cast_column("image", Image(decode=False)) if "image" in split.column_names else split


def questions_from_export(path: Path, task: str = VQA) -> list[LabelledQuestion]:
    """Every row of both splits of an exported dataset folder (``mmdemo export --format datasets``)."""
    from .data import load_export

    check_metric(task)
    if task == ASR:
        return _speech().examples_from_export(Path(path))
    data = load_export(Path(path), task, _EXPORT_COLUMNS[task])
    rows = [row for split in (data.train, data.validation) for row in undecoded(split)]
    return questions_from_rows(rows, split_groups=False, task=task)


def questions_from_campaign(store: Any, campaign: str, task: str = VQA) -> list[LabelledQuestion]:
    """The labels people submitted in an annotation campaign, one question per (image, question)
    (``suggested_by`` names the model whose suggestion someone accepted)."""
    from PIL import Image

    check_metric(task)
    if task == ASR:
        return _speech().examples_from_campaign(store, campaign)
    questions = []
    for item in campaign_inputs(store, campaign, task):
        image = Image.open(io.BytesIO(item.media)).convert("RGB")
        labelled = dict(suggested_by=item.suggested_by, output_ids=item.output_ids)
        inputs = item.output.inputs
        if task == ZERO_SHOT:
            right = agreed_labels(list(item.answers))
            questions.append(LabelledQuestion(image, "", right, labels_offered=offered(inputs.get("labels", []), right),
                                              template=inputs.get("template"), **labelled))
        else:
            questions.append(LabelledQuestion(image, inputs.get("question", ""), item.answers, **labelled))
    return questions


# --- scoring ---------------------------------------------------------------------------------------------


# Per task: (column title, result key, key of the count it is over) of each metric, headline first.
_METRICS: dict[str, tuple[tuple[str, str, str], ...]] = {
    VQA: (("VQA accuracy", "vqa_accuracy", "questions"),),
    ZERO_SHOT: (("top-1 accuracy", "top1_accuracy", "single_label"), ("F1 multi-label", "f1", "multi_label")),
    ASR: (("WER", "wer", "questions"), ("CER", "cer", "questions")),
}
_EXPORT_COLUMNS = {
    VQA: ("image", "question", "answer", "merged_record_ids"),
    ZERO_SHOT: ("image", "labels", "candidate_labels", "template", "merged_record_ids"),
}


def has_metric(task: str) -> bool:
    return task in _METRICS


def check_metric(task: str) -> None:
    if not has_metric(task):
        raise UnsupportedBaseError(f"Evaluation is not available for {task} yet; tasks: {', '.join(_METRICS)}.")


def task_inputs(task: str, question: LabelledQuestion) -> dict[str, Any]:
    """What the task is asked, besides the image: the question, or the labels (and the record's template)."""
    if task == ZERO_SHOT:
        return {"labels": list(question.labels_offered),
                **({"template": question.template} if question.template else {})}
    return {"question": question.question}


def prediction_of(task: str, result: dict[str, Any]) -> Any:
    """The part of a task's result that is scored: the answer, or the labels best first."""
    if task == ZERO_SHOT:
        return [item["label"] for item in result["labels"]]
    return result["answer"]


def _speech() -> Any:
    """Speech keeps its examples, predictions and metric (WER, CER) in mmdemo.finetune.speech."""
    from . import speech

    return speech


def loaded_model_answers(spec: Any, bundle: Any) -> Callable[[LabelledQuestion], str]:
    """Answers from a model loaded here (``bundle``: the task's loaded form), as the app computes them."""
    from ..media import MediaLimits
    from ..tasks import get_task

    if spec.task == ASR:
        return _speech().loaded_model_transcripts(spec, bundle)
    task = get_task(spec.task)

    def answer(question: LabelledQuestion) -> Any:
        request = task.prepare({**spec.defaults, "image": question.image, **task_inputs(spec.task, question)},
                               MediaLimits(), spec)
        return prediction_of(spec.task, task.predict(bundle, request))

    return answer


def served_model_answers(registry: Any, model_id: str, task: str = VQA) -> Callable[[LabelledQuestion], str]:
    """Answers of a catalog model through the registry (``mmdemo.tasks.run``)."""
    from ..tasks import run

    if task == ASR:
        return _speech().served_model_transcripts(registry, model_id)
    return lambda question: prediction_of(task, run(registry, task, model_id, image=question.image,
                                                    **task_inputs(task, question)))


def score(answer: Callable[[LabelledQuestion], Any], questions: list[LabelledQuestion],
          task: str = VQA) -> dict[str, Any]:
    """The task's metric of ``answer`` (question -> the model's prediction) over ``questions``, overall
    and per group (accepted / corrected)."""
    if task == ASR:
        return _speech().score(answer, questions)
    summarise = zero_shot_metrics if task == ZERO_SHOT else _vqa_metrics
    scored = [(question, answer(question)) for question in questions]
    result = summarise(scored)
    for group in sorted({question.group for question in questions if question.group}):
        result[group] = summarise([pair for pair in scored if pair[0].group == group])
    return result


def _vqa_metrics(scored: list[tuple[LabelledQuestion, str]]) -> dict[str, Any]:
    return {"vqa_accuracy": _mean([vqa_accuracy(answer, q.answers) for q, answer in scored]), "questions": len(scored)}


def describe_source(questions: list[LabelledQuestion], source: dict[str, Any]) -> dict[str, Any]:
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


def format_table(results: dict[str, dict[str, Any]], source: dict[str, Any], task: str = VQA) -> str:
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


def table_rows(results: dict[str, dict[str, Any]], task: str = VQA) -> tuple[list[str], list[list[str]]]:
    """The headers ("model", then the task's metrics overall and, when present, on accepted / corrected
    rows apart) and one row of cells per model (``"0.500 (4)"``: the score and the count it is over)."""
    metrics = _METRICS[task]
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


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# --- zero-shot classification ------------------------------------------------------------------------------


def agreed_labels(votes: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """The labels at least half of the people gave (each vote: one person's labels), in first-given order."""
    votes = [list(dict.fromkeys(label.strip() for label in vote)) for vote in votes]
    counts = Counter(label.casefold() for vote in votes for label in vote)
    first = {}
    for vote in votes:
        for label in vote:
            first.setdefault(label.casefold(), label)
    return tuple(label for key, label in first.items() if 2 * counts[key] >= len(votes))


def offered(candidates: Iterable[str], right: Iterable[str]) -> tuple[str, ...]:
    """The labels the model chooses from: those offered, then any right label a person typed in."""
    found = {label.casefold(): label for label in candidates}
    for label in right:
        found.setdefault(label.casefold(), label)
    return tuple(found.values())


def labelled_images_from_rows(rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[LabelledQuestion]:
    """Exported zero-shot rows (image bytes, labels, candidate_labels, template, merged_record_ids)
    grouped by (image, labels offered, template), the right labels agreed as :func:`agreed_labels`."""
    from PIL import Image

    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        data = row["image"]["bytes"]
        key = (hashlib.sha256(data).hexdigest(), tuple(row["candidate_labels"]), row.get("template"))
        group = groups.setdefault(key, {"image": data, "votes": [], "corrected": False})
        group["votes"] += [row["labels"]] * (1 + len(row.get("merged_record_ids") or []))
        group["corrected"] = group["corrected"] or bool(row.get("corrected"))
    found = []
    for (_, candidates, template), group in groups.items():
        right = agreed_labels(group["votes"])
        kind = (CORRECTED if group["corrected"] else ACCEPTED) if split_groups else None
        found.append(LabelledQuestion(Image.open(io.BytesIO(group["image"])).convert("RGB"), "", right, kind,
                                      labels_offered=offered(candidates, right), template=template))
    return found


def zero_shot_metrics(scored: list[tuple[LabelledQuestion, list[str]]]) -> dict[str, Any]:
    """Top-1 accuracy over single-label images, micro F1 of the top-k labels over multi-label ones."""
    hits: list[float] = []
    true_pos = false_pos = false_neg = multi = 0
    for question, ranked in scored:
        right = {label.casefold() for label in question.answers}
        chosen = {label.casefold() for label in ranked[:len(right)]}
        if len(right) == 1:
            hits.append(float(chosen == right))
            continue
        multi += 1
        true_pos += len(chosen & right)
        false_pos += len(chosen - right)
        false_neg += len(right - chosen)
    f1 = round(2 * true_pos / (2 * true_pos + false_pos + false_neg), 4) if multi else None
    return {"top1_accuracy": _mean(hits), "single_label": len(hits), "f1": f1, "multi_label": multi,
            "questions": len(scored)}
