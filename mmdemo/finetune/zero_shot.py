"""Fine-tuning zero-shot image classification: CLIP and SigLIP, contrastive on (image, label text) pairs.

Each label goes through the record's template (the model's default when the record has none), as the
app classifies. The texts of a batch are every right label and every label offered of its rows; an
image's positives are its right labels (several for a multi-label record), every other text of the
batch is a negative.

* CLIP learns with its symmetric InfoNCE loss: cross-entropy of each image over the batch's texts and
  of each right text over the batch's images, with a soft target spread evenly over the positives.
* SigLIP learns with its sigmoid loss: an independent binary decision per (image, text) pair.

The evaluation (:class:`ZeroShotEvaluation`): the model ranks the labels offered with the image (plus the
right ones, if a person typed a label that was not offered), through the record's template or the model's
default. Single-label images score top-1 accuracy; multi-label images (several right labels) score micro
F1 of the model's top k labels, k being the number of right labels. The right labels of an image several
people labelled are those at least half of them gave.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from ..catalog import ModelSpec
from ..errors import InvalidInputError
from ..placement import Placement
from ..tasks.base import load_kwargs
from ..tasks.zero_shot import ZeroShotBundle, ZeroShotRequest, fill_template, parse_template
from .base import ATTENTION_MLP_TARGETS, FinetuneAdapter
from .data import TrainingData
from .errors import InvalidDatasetError
from .evaluate import LabelledQuestion, TaskEvaluation, average, group_of, grouped_rows, image_of
from .labels import CampaignInput

TASK = "zero-shot-image-classification"

# --- the evaluation ----------------------------------------------------------------------------------------


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
    return {"top1_accuracy": average(hits), "single_label": len(hits), "f1": f1, "multi_label": multi,
            "questions": len(scored)}


class ZeroShotEvaluation(TaskEvaluation):
    """Top-1 accuracy (single-label images) and micro F1 (multi-label ones) of the labels the model ranks."""

    task = TASK
    metrics = (("top-1 accuracy", "top1_accuracy", "single_label"), ("F1 multi-label", "f1", "multi_label"))
    export_columns = ("image", "labels", "candidate_labels", "template", "merged_record_ids")

    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[LabelledQuestion]:
        """Rows grouped by (image, labels offered, template), the right labels agreed as :func:`agreed_labels`."""
        found = []
        for group in grouped_rows(rows, key=lambda row: (tuple(row["candidate_labels"]), row.get("template")),
                                  label=lambda row: row["labels"]):
            right = agreed_labels(group["labels"])
            found.append(LabelledQuestion(image_of(group["image"]), "", right,
                                          group_of(group["corrected"], split_groups),
                                          labels_offered=offered(group["row"]["candidate_labels"], right),
                                          template=group["row"].get("template")))
        return found

    def example_from_campaign(self, item: CampaignInput, campaign: str) -> LabelledQuestion:
        right = agreed_labels(list(item.answers))
        inputs = item.output.inputs
        return LabelledQuestion(image_of(item.media), "", right, suggested_by=item.suggested_by,
                                output_ids=item.output_ids, labels_offered=offered(inputs.get("labels", []), right),
                                template=inputs.get("template"))

    def accepted_answer(self, output: dict[str, Any]) -> list[str]:
        return [output["labels"][0]["label"]]

    def task_inputs(self, example: LabelledQuestion) -> dict[str, Any]:
        """The image, the labels offered and the record's template (if it had one)."""
        return {"image": example.image, "labels": list(example.labels_offered),
                **({"template": example.template} if example.template else {})}

    def prediction(self, result: dict[str, Any]) -> list[str]:
        """The labels, best first."""
        return [item["label"] for item in result["labels"]]

    def summarise(self, scored: list[tuple[LabelledQuestion, list[str]]]) -> dict[str, Any]:
        return zero_shot_metrics(scored)


# --- fine-tuning -------------------------------------------------------------------------------------------


class ZeroShotAdapter(FinetuneAdapter):
    task = TASK
    kinds = frozenset({"clip", "siglip"})
    columns = ("image", "labels", "candidate_labels", "template", "corrected", "merged_record_ids", "output_id")
    augmentations = ("crop", "flip", "colour")
    default_augmentations = ("crop", "flip")  # labels may be colours: colour jitter only when asked for
    evaluation = ZeroShotEvaluation()
    # SigLIP: not its pooling head's nn.MultiheadAttention, which reads out_proj's weight without calling it
    lora_targets = {"clip": ATTENTION_MLP_TARGETS,
                    "siglip": ("q_proj", "k_proj", "v_proj", "self_attn.out_proj", "fc1", "fc2")}

    def __init__(self) -> None:
        self.default_template = ZeroShotRequest.template  # the base's own, once it is loaded

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        import torch
        from transformers import AutoProcessor, CLIPModel, SiglipModel

        model_class = {"clip": CLIPModel, "siglip": SiglipModel}[spec.kind]
        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = model_class.from_pretrained(location, dtype=torch.float32, **kwargs)
        self.default_template = spec.defaults.get("template", ZeroShotRequest.template)
        return model.to(placement.device), processor

    def serving_bundle(self, model: Any, processor: Any, spec: ModelSpec, placement: Placement) -> Any:
        return ZeroShotBundle(model.eval(), processor, placement, kind=spec.kind)

    def prepare_data(self, data: TrainingData) -> TrainingData:
        """Refuses a row without a right label or with a template the app would refuse."""
        for split_name, split in (("train", data.train), ("validation", data.validation)):
            for n, (labels, template) in enumerate(zip(split["labels"], split["template"])):
                where = f"Row {n} of the {split_name} split"
                if not labels or not any(label.strip() for label in labels):
                    raise InvalidDatasetError(f"{where} has no right label; label it or leave it out.")
                if template is not None:
                    try:
                        parse_template(template)
                    except InvalidInputError as exc:
                        raise InvalidDatasetError(f"{where} has the template {template!r}: {exc}") from None
        return data

    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        import torch

        images = [image.convert("RGB") for image in rows["image"]]
        # 1. the batch's texts: each right and offered label through its row's template, once each
        texts: dict[tuple[str, str], str] = {}
        for labels, offered, template in zip(rows["labels"], rows["candidate_labels"], rows["template"]):
            for label in [*labels, *offered]:
                texts.setdefault((template or self.default_template, label.strip().casefold()),
                                 fill_template(template or self.default_template, label.strip()))
        # 2. targets: image i and text j match when j's label is one of i's right labels
        keys = list(texts)
        targets = torch.tensor([[float(label in {x.strip().casefold() for x in labels}) for _, label in keys]
                                for labels in rows["labels"]])
        padding = "max_length" if model.config.model_type == "siglip" else True  # as the task pads
        encoded = processor(images=images, text=list(texts.values()), padding=padding, truncation=True,
                            return_tensors="pt")
        return {**encoded, "targets": targets}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        targets = batch["targets"]
        logits = model(**{k: v for k, v in batch.items() if k != "targets"}).logits_per_image  # images x texts
        if getattr(model, "module", model).config.model_type == "siglip":  # the model, or its DDP wrapper
            # one binary decision per (image, text) pair, summed over texts, averaged over images
            return -F.logsigmoid((2 * targets - 1) * logits).sum() / logits.shape[0]
        # symmetric InfoNCE: images over texts, and each text that some image has over the images
        per_image = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        wanted = targets.sum(0) > 0
        columns = targets[:, wanted]
        per_text = -(columns / columns.sum(0, keepdim=True) * logits[:, wanted].log_softmax(0)).sum(0).mean()
        return (per_image + per_text) / 2
