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
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..catalog import ModelSpec
from ..placement import Placement
from ..tasks.base import load_kwargs
from .base import FinetuneAdapter
from .config import FinetuneConfig
from .data import TrainingData
from .errors import InvalidDatasetError
from .evaluate import group_vqa_rows, normalize_answer, undecoded


class VqaAdapter(FinetuneAdapter):
    task = "visual-question-answering"
    kinds = frozenset({"vilt", "blip"})
    columns = ("image", "question", "answer", "corrected", "merged_record_ids", "output_id")

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
