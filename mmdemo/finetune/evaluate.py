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
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import InvalidDatasetError, UnsupportedBaseError

VQA = "visual-question-answering"
ASR = "automatic-speech-recognition"  # WER and CER: mmdemo.finetune.speech
ACCEPTED, CORRECTED = "accepted", "corrected"
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


def questions_from_rows(rows: Iterable[dict[str, Any]], *, split_groups: bool, task: str = VQA) -> list[Any]:
    """:class:`LabelledQuestion` s from exported rows; ``split_groups`` marks each accepted or corrected."""
    from PIL import Image

    if task != VQA:
        return _metric_module(task).examples_from_rows(rows, split_groups=split_groups)
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
    if task != VQA:
        return _metric_module(task).examples_from_export(Path(path))
    data = load_export(Path(path), task, ("image", "question", "answer", "merged_record_ids"))
    rows = [row for split in (data.train, data.validation) for row in undecoded(split)]
    return questions_from_rows(rows, split_groups=False)


def questions_from_campaign(store: Any, campaign: str, task: str = VQA) -> list[LabelledQuestion]:
    """The labels people submitted in an annotation campaign, grouped by (image, question). A label
    without a correction is the suggestion the person accepted (``suggested_by`` names its model)."""
    from PIL import Image

    from ..feedback import AnnotationQueue

    check_metric(task)
    if task != VQA:
        return _metric_module(task).examples_from_campaign(store, campaign)
    queue = AnnotationQueue(store)
    found = queue.campaign(campaign)
    if found.task != task:
        raise InvalidDatasetError(f"Campaign {found.name!r} is a {found.task} campaign, not {task}.")
    groups: dict[str, dict[str, Any]] = {}
    for record in queue.labels(found):
        out = record.output
        accepted = record.correction is None
        answer = out.output["answer"] if accepted else record.correction
        group = groups.setdefault(out.input_key, {"ref": out.input_media[0], "question": out.inputs["question"],
                                                  "answers": [], "suggested_by": None, "output_ids": set()})
        group["answers"].append(answer)
        group["output_ids"].add(out.id)
        if accepted:
            group["suggested_by"] = out.model_id
    if not groups:
        raise InvalidDatasetError(f"Campaign {found.name!r} has no submitted labels to evaluate on.")
    questions = []
    for group in groups.values():
        try:
            data = store.media.read_bytes(group["ref"])
        except FileNotFoundError:
            raise InvalidDatasetError(f"An image of campaign {found.name!r} is missing from the media store "
                                      f"({group['ref']}).") from None
        questions.append(LabelledQuestion(Image.open(io.BytesIO(data)).convert("RGB"), group["question"],
                                          tuple(group["answers"]), suggested_by=group["suggested_by"],
                                          output_ids=tuple(sorted(group["output_ids"]))))
    return questions


# --- scoring ---------------------------------------------------------------------------------------------


def has_metric(task: str) -> bool:
    return task in (VQA, ASR)


def check_metric(task: str) -> None:
    if not has_metric(task):
        raise UnsupportedBaseError(f"Evaluation is not available for {task} yet; tasks: {VQA}, {ASR}.")


def _metric_module(task: str) -> Any:
    """The module holding another task's examples, predictions and metric (VQA's are in this one)."""
    check_metric(task)
    from . import speech

    return {ASR: speech}[task]


def loaded_model_answers(spec: Any, bundle: Any) -> Callable[[LabelledQuestion], str]:
    """Answers from a model loaded here (``bundle``: the task's loaded form), as the app computes them."""
    from ..media import MediaLimits
    from ..tasks import get_task

    if spec.task != VQA:
        return _metric_module(spec.task).loaded_model_transcripts(spec, bundle)
    task = get_task(spec.task)

    def answer(question: LabelledQuestion) -> str:
        request = task.prepare({**spec.defaults, "image": question.image, "question": question.question},
                               MediaLimits(), spec)
        return task.predict(bundle, request)["answer"]

    return answer


def served_model_answers(registry: Any, model_id: str, task: str = VQA) -> Callable[[LabelledQuestion], str]:
    """Answers of a catalog model through the registry (``mmdemo.tasks.run``)."""
    from ..tasks import run

    if task != VQA:
        return _metric_module(task).served_model_transcripts(registry, model_id)
    return lambda question: run(registry, task, model_id, image=question.image, question=question.question)["answer"]


def score(answer: Callable[[Any], str], questions: list[Any], task: str = VQA) -> dict[str, Any]:
    """VQA accuracy of ``answer`` (question -> the model's answer) over ``questions``, overall and per group
    (another task: its metric, e.g. WER and CER)."""
    if task != VQA:
        return _metric_module(task).score(answer, questions)
    per_group: dict[str, list[float]] = {}
    values = []
    for question in questions:
        value = vqa_accuracy(answer(question), question.answers)
        values.append(value)
        if question.group:
            per_group.setdefault(question.group, []).append(value)
    result: dict[str, Any] = {"vqa_accuracy": _mean(values), "questions": len(values)}
    for group, group_values in sorted(per_group.items()):
        result[group] = {"vqa_accuracy": _mean(group_values), "questions": len(group_values)}
    return result


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
    """A plain-text table: one line per model, VQA accuracy (another task: its metrics) overall and
    accepted / corrected apart."""
    groups = [g for g in (ACCEPTED, CORRECTED) if any(g in r for r in results.values())]
    metrics = _metric_module(task).TABLE_COLUMNS if task != VQA else (("vqa_accuracy", "VQA accuracy"),)
    columns = [(key, title, group) for group in (None, *groups) for key, title in metrics]
    titles = [title if group is None else f"{title} {group}" if len(metrics) > 1 else f"{group} rows"
              for _, title, group in columns]
    widths = [max(len(title), 14) for title in titles]
    width = max([len("model"), *map(len, results)])
    header = f"{'model':<{width}}" + "".join(f"  {title:>{w}}" for title, w in zip(titles, widths))
    lines = [header]
    for name, result in results.items():
        cells = "".join(f"  {_cell(result if group is None else result.get(group), key):>{w}}"
                        for (key, _, group), w in zip(columns, widths))
        lines.append(f"{name:<{width}}{cells}")
    where = source.get("campaign") or source.get("dataset") or source.get("kind", "")
    lines.append(f"on {source['questions']} questions ({where})")
    if source.get("note"):
        lines.append(f"note: {source['note']}")
    return "\n".join(lines)


def _cell(result: dict[str, Any] | None, key: str = "vqa_accuracy") -> str:
    if not result or result.get(key) is None:
        return "-"
    return f"{result[key]:.3f} ({result['questions']})"


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
