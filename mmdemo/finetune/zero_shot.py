"""Fine-tuning zero-shot image classification: CLIP and SigLIP, contrastive on (image, label text) pairs.

Each label goes through the record's template (the model's default when the record has none), as the
app classifies. The texts of a batch are every right label and every label offered of its rows; an
image's positives are its right labels (several for a multi-label record), every other text of the
batch is a negative.

* CLIP learns with its symmetric InfoNCE loss: cross-entropy of each image over the batch's texts and
  of each right text over the batch's images, with a soft target spread evenly over the positives.
* SigLIP learns with its sigmoid loss: an independent binary decision per (image, text) pair.
"""

from __future__ import annotations

from typing import Any

from ..catalog import ModelSpec
from ..errors import InvalidInputError
from ..placement import Placement
from ..tasks.base import load_kwargs
from ..tasks.zero_shot import ZeroShotBundle, ZeroShotRequest, fill_template, parse_template
from .base import FinetuneAdapter
from .data import TrainingData
from .errors import InvalidDatasetError


class ZeroShotAdapter(FinetuneAdapter):
    task = "zero-shot-image-classification"
    kinds = frozenset({"clip", "siglip"})
    columns = ("image", "labels", "candidate_labels", "template", "corrected", "merged_record_ids", "output_id")

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
        if model.config.model_type == "siglip":
            # one binary decision per (image, text) pair, summed over texts, averaged over images
            return -F.logsigmoid((2 * targets - 1) * logits).sum() / logits.shape[0]
        # symmetric InfoNCE: images over texts, and each text that some image has over the images
        per_image = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        wanted = targets.sum(0) > 0
        columns = targets[:, wanted]
        per_text = -(columns / columns.sum(0, keepdim=True) * logits[:, wanted].log_softmax(0)).sum(0).mean()
        return (per_image + per_text) / 2
