"""Fine-tuning visual question answering: ViLT (a classifier over its answer list) and BLIP (it writes
the answer).

The exported rows (image, question, answer) are grouped by (image, question) first, so that a question
several people answered is one example with all their answers.

* ViLT learns VQAv2's soft scores with binary cross-entropy, as it was trained: an answer given by
  ``n`` of several people scores ``min(n / 3, 1)``; the only answer given scores 1. Answers it does not
  know extend its answer head: the rows of the answers it knows are copied unchanged, new rows are
  appended, and ``id2label`` / ``label2id`` are saved with it. With ``extend=False`` an unknown answer
  fails the job before training, naming the answer.
* BLIP learns to write the most frequent answer (question encoded with the image, answer decoded).

The evaluation (:class:`VqaEvaluation`) scores the standard VQA accuracy: the VQA normalisation (lower case,
punctuation and articles dropped, number words as digits) and, when several people answered a question,
``min(#people who gave the answer / 3, 1)``; with one answer it is an exact match after normalisation.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

from ..catalog import ModelSpec
from ..placement import Placement
from ..tasks.base import load_kwargs
from .base import BERT_TARGETS, BLIP_TARGETS, FinetuneAdapter
from .config import FinetuneConfig
from .data import TrainingData
from .errors import InvalidDatasetError
from .evaluate import LabelledQuestion, TaskEvaluation, average, group_of, grouped_rows, image_of, undecoded
from .labels import CampaignInput

TASK = "visual-question-answering"

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


def group_vqa_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exported VQA rows (image bytes, question, answer, merged_record_ids, corrected) grouped by
    (image, question): ``{"image": bytes, "question", "answers": [..], "corrected": bool}``, each
    answer repeated once per person who gave it (exact duplicates were merged by the export)."""
    return [{"image": group["image"], "question": group["row"]["question"], "answers": group["labels"],
             "corrected": group["corrected"]}
            for group in grouped_rows(rows, key=lambda row: row["question"].strip(), label=lambda row: row["answer"])]


class VqaEvaluation(TaskEvaluation):
    """VQA accuracy of the answer to each (image, question), every person's answer counting."""

    task = TASK
    metrics = (("VQA accuracy", "vqa_accuracy", "questions"),)
    export_columns = ("image", "question", "answer", "merged_record_ids")

    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[LabelledQuestion]:
        return [LabelledQuestion(image_of(group["image"]), group["question"], tuple(group["answers"]),
                                 group_of(group["corrected"], split_groups))
                for group in group_vqa_rows(rows)]

    def example_from_campaign(self, item: CampaignInput, campaign: str) -> LabelledQuestion:
        return LabelledQuestion(image_of(item.media), item.output.inputs.get("question", ""), item.answers,
                                suggested_by=item.suggested_by, output_ids=item.output_ids)

    def accepted_answer(self, output: dict[str, Any]) -> str:
        return output["answer"]

    def task_inputs(self, example: LabelledQuestion) -> dict[str, Any]:
        return {"image": example.image, "question": example.question}

    def prediction(self, result: dict[str, Any]) -> str:
        return result["answer"]

    def summarise(self, scored: list[tuple[LabelledQuestion, str]]) -> dict[str, Any]:
        return {"vqa_accuracy": average([vqa_accuracy(answer, q.answers) for q, answer in scored]),
                "questions": len(scored)}


# --- fine-tuning -------------------------------------------------------------------------------------------


class VqaAdapter(FinetuneAdapter):
    task = TASK
    kinds = frozenset({"vilt", "blip"})
    columns = ("image", "question", "answer", "corrected", "merged_record_ids", "output_id")
    augmentations = ("crop", "flip", "colour")
    default_augmentations = ("crop",)  # questions ask about left and right, and colours: flip, colour when asked
    evaluation = VqaEvaluation()
    lora_targets = {"vilt": BERT_TARGETS, "blip": BLIP_TARGETS}
    lora_modules_to_save = {"vilt": ("classifier",)}  # its answer head, maybe extended with new answers

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        import torch
        from transformers import AutoProcessor, BlipForQuestionAnswering, ViltForQuestionAnswering

        model_class = {"vilt": ViltForQuestionAnswering, "blip": BlipForQuestionAnswering}[spec.kind]
        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = model_class.from_pretrained(location, dtype=torch.float32, **kwargs)
        return model.to(placement.device), processor

    def prepare_data(self, data: TrainingData) -> TrainingData:
        """One example per (image, question) with every answer given (``answers``)."""
        return TrainingData(grouped(data.train), grouped(data.validation), data.source, data.fingerprint, data.rows)

    def prepare_model(self, model: Any, processor: Any, data: TrainingData, config: FinetuneConfig) -> dict[str, Any]:
        """ViLT: answers it does not know extend its head (or, with ``config.extend`` off, fail the job)."""
        if model.config.model_type != "vilt":
            return {}
        known = answer_ids(model)
        answers = [a for split in (data.train, data.validation) for group in split["answers"] for a in group]
        unknown = list(dict.fromkeys(normalize_answer(a) for a in answers if normalize_answer(a) not in known))
        if unknown and not config.extend:
            shown = ", ".join(repr(a) for a in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise InvalidDatasetError(
                f"{len(unknown)} answer(s) in the labels are not among the {len(known)} answers "
                f"'{config.base}' can give: {shown}. Fine-tune with extend on (--extend) to add them to its "
                "answer head, or correct those labels.")
        if unknown:
            extend_answer_head(model, unknown)
        return {"answers_known": len(known), "answers_added": unknown}

    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        images = [image.convert("RGB") for image in rows["image"]]
        questions = [question.strip() for question in rows["question"]]
        if model.config.model_type == "vilt":
            encoded = processor(images=images, text=questions, padding=True, truncation=True, return_tensors="pt")
            return {**encoded, "labels": soft_scores(model, rows["answers"])}
        return {**blip_batch(model, processor, images, questions, rows["answers"], max_length)}


def grouped(split: Any) -> Any:
    """An exported split as one row per (image, question): image, question, answers (one per person)."""
    import datasets

    groups = group_vqa_rows(undecoded(split))
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": g["image"], "path": None} for g in groups],
        "question": [g["question"] for g in groups],
        "answers": [g["answers"] for g in groups],
    }, features=features)


def answer_ids(model: Any) -> dict[str, int]:
    """ViLT's answers in normal form (as the VQA evaluation compares them) -> their head row."""
    return {normalize_answer(label): int(i) for i, label in model.config.id2label.items()}


def extend_answer_head(model: Any, answers: list[str]) -> None:
    """Append one output row per new answer to ViLT's classifier; the known rows are copied unchanged."""
    import torch

    old = model.classifier[-1]
    new = torch.nn.Linear(old.in_features, old.out_features + len(answers), device=old.weight.device,
                          dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.normal_(0.0, model.config.initializer_range)
        new.bias.zero_()
        new.weight[:old.out_features] = old.weight
        new.bias[:old.out_features] = old.bias
    model.classifier[-1] = new
    labels = {int(i): label for i, label in model.config.id2label.items()}
    labels.update({old.out_features + n: answer for n, answer in enumerate(answers)})
    model.config.id2label = labels
    model.config.label2id = {label: i for i, label in labels.items()}
    model.num_labels = len(labels)


def soft_scores(model: Any, answer_lists: list[list[str]]) -> Any:
    """VQAv2 targets: ``min(n / 3, 1)`` for an answer ``n`` of several people gave; 1 for a lone answer."""
    import torch

    ids = answer_ids(model)
    labels = torch.zeros(len(answer_lists), len(ids))
    for row, answers in enumerate(answer_lists):
        counts = Counter(normalize_answer(answer) for answer in answers)
        for answer, count in counts.items():
            labels[row, ids[answer]] = min(count / 3, 1.0) if len(answers) > 1 else 1.0
    return labels


def blip_batch(model: Any, processor: Any, images: list[Any], questions: list[str], answer_lists: list[list[str]],
               max_length: int) -> dict[str, Any]:
    """BLIP VQA: the question with the image in, the most frequent answer out (from its [DEC] token)."""
    encoded = processor(images=images, text=questions, padding=True, truncation=True, return_tensors="pt")
    answers = [Counter(a.strip() for a in group).most_common(1)[0][0] for group in answer_lists]
    target = processor.tokenizer(answers, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    decoder_input_ids = target["input_ids"].clone()
    decoder_input_ids[:, 0] = model.config.text_config.bos_token_id  # [CLS] -> [DEC], as generate() starts
    labels = decoder_input_ids.masked_fill(target["attention_mask"] == 0, -100)  # no loss on padding
    return {"pixel_values": encoded["pixel_values"], "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"], "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": target["attention_mask"], "labels": labels}
