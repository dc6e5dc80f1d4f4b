"""Fine-tuning zero-shot object detection: OWL-ViT, OWLv2 and Grounding DINO on the boxes people kept, fixed
or drew (the export's CPPE-5-like rows: image, objects with COCO bbox and category, the queries asked).

Each row is asked its own queries (plus any category a person typed that was not asked), as the app asks.
The loss is DETR's, as OWL-ViT was trained: each image's boxes are matched one to one to the model's
predicted boxes (Hungarian matching, ``scipy.optimize.linear_sum_assignment``, on class + L1 + GIoU costs),
then a sigmoid focal loss scores every (predicted box, query) pair (matched pairs are positives, all others
negatives) and the matched boxes learn their L1 and GIoU distances, each normalised by the number of boxes.
transformers gives OWL-ViT and OWLv2 no training loss. It does compute Grounding DINO's from ``labels``, but
finds each query's tokens by the ids of bert-base-uncased's ``[CLS]``, ``[SEP]``, ``.`` and ``?`` (hard-coded),
which a checkpoint with another vocabulary (the tiny one) does not share; so Grounding DINO takes the same
loss, a query scoring a box by its best token, exactly as the app scores it (``mmdemo.tasks.detection``).

The evaluation (:class:`DetectionEvaluation`) is mAP@0.5: per category, the model's boxes over all images
ranked by score, a box a hit when it overlaps an unclaimed box of its category by IoU >= 0.5 (a second box on
the same object is a miss), AP the area under the precision-recall curve with all-point interpolation; the
mean over the categories that have boxes in the labels. Each person's boxes for an image count as one labelled
image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from PIL import Image

from ..catalog import ModelSpec
from ..placement import Placement
from ..tasks.base import load_kwargs
from ..tasks.detection import (COORDINATES, DEFAULT_MAX_BOXES, QUERY_SEPARATOR, DetectionBundle, model_frame,
                               model_view, query_of_tokens, relative_box)
from .base import FinetuneAdapter
from .data import TrainingData
from .errors import InvalidDatasetError
from .evaluate import TaskEvaluation, group_of, grouped_rows, image_of, undecoded
from .labels import CampaignInput
from .zero_shot import offered

TASK = "zero-shot-object-detection"
IOU_THRESHOLD = 0.5
# DETR's weights (class 1, L1 5, GIoU 2), the same for matching and for the loss
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 1.0, 5.0, 2.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
EDGE_TOLERANCE = 0.5  # pixels: exported coordinates are rounded to 0.1

Corners = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in the image's pixels
Box = tuple[str, Corners]                     # (category, corners)


@dataclass(frozen=True)
class LabelledBoxes:
    """One image and its queries with the boxes each person gave (``answers``: one tuple of boxes a person)."""

    image: Any
    queries: tuple[str, ...]
    answers: tuple[tuple[Box, ...], ...]
    group: str | None = None
    suggested_by: str | None = None
    output_ids: tuple[str, ...] = ()


def exported_boxes(objects: Iterable[Mapping[str, Any]]) -> tuple[Box, ...]:
    """An exported row's objects (COCO ``bbox [x, y, width, height]``, ``category``) as (category, corners)."""
    return tuple((item["category"], (x, y, x + w, y + h)) for item in objects for x, y, w, h in [item["bbox"]])


def stored_boxes(boxes: Iterable[Mapping[str, Any]]) -> tuple[Box, ...]:
    """A stored output's or correction's ``[{label, box: {xmin, ymin, xmax, ymax}}]`` as (category, corners)."""
    return tuple((item["label"], tuple(float(item["box"][c]) for c in COORDINATES)) for item in boxes)


# --- mAP@0.5 -----------------------------------------------------------------------------------------------


def box_iou(a: Corners, b: Corners) -> float:
    """Intersection over union of two boxes given by their corners."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def average_precision(hits: list[bool], positives: int) -> float:
    """AP of detections ranked best first (``hits``: whether each is a true positive) against ``positives``
    labelled boxes: the area under the precision-recall curve, precision made non-increasing (all-point
    interpolation, as PASCAL VOC since 2010 and COCO compute it)."""
    if not positives:
        return 0.0
    precisions, recalls, found = [], [], 0
    for rank, hit in enumerate(hits, 1):
        found += hit
        precisions.append(found / rank)
        recalls.append(found / positives)
    area, best, previous_recall = 0.0, 0.0, 0.0
    envelope = []
    for precision in reversed(precisions):  # the best precision at this recall or beyond
        best = max(best, precision)
        envelope.append(best)
    for recall, precision in zip(recalls, reversed(envelope)):
        area += (recall - previous_recall) * precision
        previous_recall = recall
    return area


def mean_average_precision(images: list[tuple[tuple[Box, ...], list[tuple[str, float, Corners]]]],
                           iou_threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
    """mAP of (labelled boxes, detections as (category, score, corners)) per image: the mean over the categories
    (case-insensitive) that have labelled boxes of each one's :func:`average_precision`, a detection being a hit
    when its best-overlapping unclaimed labelled box of its category has IoU >= ``iou_threshold``."""
    truth: dict[str, dict[int, list[Corners]]] = {}
    for index, (boxes, _) in enumerate(images):
        for category, corners in boxes:
            truth.setdefault(category.casefold(), {}).setdefault(index, []).append(corners)
    per_category = {}
    for category, by_image in truth.items():
        ranked = sorted(((score, index, corners) for index, (_, found) in enumerate(images)
                         for label, score, corners in found if label.casefold() == category), key=lambda d: -d[0])
        claimed = {index: [False] * len(boxes) for index, boxes in by_image.items()}
        hits = []
        for _, index, corners in ranked:
            overlaps = [box_iou(corners, box) for box in by_image.get(index, [])]
            best = max(range(len(overlaps)), key=overlaps.__getitem__, default=None)
            hit = best is not None and overlaps[best] >= iou_threshold and not claimed[index][best]
            if hit:
                claimed[index][best] = True
            hits.append(hit)
        per_category[category] = round(average_precision(hits, sum(map(len, by_image.values()))), 4)
    mean = round(sum(per_category.values()) / len(per_category), 4) if per_category else None
    return {"map50": mean, "images": len(images), "categories": len(per_category), "ap_per_category": per_category}


class DetectionEvaluation(TaskEvaluation):
    """mAP@0.5 of the boxes the model finds for each image's queries (see the module's docstring)."""

    task = TASK
    metrics = (("mAP@0.5", "map50", "images"),)
    export_columns = ("image", "objects", "queries", "merged_record_ids")

    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[LabelledBoxes]:
        return [LabelledBoxes(image_of(group["image"]), tuple(group["row"]["queries"]), tuple(group["labels"]),
                              group_of(group["corrected"], split_groups))
                for group in grouped_rows(rows, key=lambda row: tuple(row["queries"]),
                                          label=lambda row: exported_boxes(row["objects"]))]

    def example_from_campaign(self, item: CampaignInput, campaign: str) -> LabelledBoxes:
        return LabelledBoxes(image_of(item.media), tuple(item.output.inputs.get("queries", ())),
                             tuple(stored_boxes(boxes) for boxes in item.answers), suggested_by=item.suggested_by,
                             output_ids=item.output_ids)

    def accepted_answer(self, output: dict[str, Any]) -> list[dict[str, Any]]:
        return output["boxes"]

    def task_inputs(self, example: LabelledBoxes) -> dict[str, Any]:
        """The image and its queries (plus categories people typed), every box the model finds ranked."""
        categories = [category for boxes in example.answers for category, _ in boxes]
        return {"image": example.image, "queries": list(offered(example.queries, categories)), "threshold": 0.0,
                "max_boxes": DEFAULT_MAX_BOXES}

    def prediction(self, result: dict[str, Any]) -> list[tuple[str, float, Corners]]:
        return [(item["label"], item["score"], tuple(item["box"][c] for c in COORDINATES)) for item in result["boxes"]]

    def summarise(self, scored: list[tuple[LabelledBoxes, list[tuple[str, float, Corners]]]]) -> dict[str, Any]:
        return mean_average_precision([(boxes, found) for example, found in scored for boxes in example.answers])


# --- fine-tuning -------------------------------------------------------------------------------------------


class DetectionAdapter(FinetuneAdapter):
    task = TASK
    kinds = frozenset({"owlvit", "owlv2", "grounding-dino"})
    columns = ("image", "objects", "queries", "width", "height", "corrected", "merged_record_ids", "output_id")
    evaluation = DetectionEvaluation()

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        import torch
        from transformers import AutoProcessor

        from ..tasks.detection import model_class

        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = model_class(spec.kind).from_pretrained(location, dtype=torch.float32, **kwargs)
        return model.to(placement.device), processor

    def serving_bundle(self, model: Any, processor: Any, spec: ModelSpec, placement: Placement) -> Any:
        return DetectionBundle(model.eval(), processor, placement, kind=spec.kind)

    def prepare_data(self, data: TrainingData) -> TrainingData:
        """Refuses a box that is empty or reaches outside its image, naming the row and the box."""
        for split_name, split in (("train", data.train), ("validation", data.validation)):
            for n, row in enumerate(undecoded(split.select_columns(["image", "objects"]))):
                with Image.open(io.BytesIO(row["image"]["bytes"])) as image:  # the header only
                    width, height = image.size
                for number, item in enumerate(row["objects"], 1):
                    x, y, w, h = item["bbox"]
                    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + EDGE_TOLERANCE \
                            or y + h > height + EDGE_TOLERANCE:
                        raise InvalidDatasetError(
                            f"Row {n} of the {split_name} split: box {number} ({item['category']}, bbox "
                            f"[x, y, width, height] {[round(v, 1) for v in item['bbox']]}) does not lie inside its "
                            f"{width}x{height} image; fix or remove that box.")
        return data

    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        import torch

        kind = model.config.model_type
        # 1. what each image is asked, the image as the app shows it to the model, its boxes as the model's
        views, queries, targets = [], [], []
        for image, objects, asked in zip(rows["image"], rows["objects"], rows["queries"]):
            view, scale = model_view(image.convert("RGB"))
            boxes = exported_boxes(objects)
            offered_here = list(offered(asked, [category for category, _ in boxes]))
            index = {query.casefold(): n for n, query in enumerate(offered_here)}
            frame = model_frame(kind, view)
            views.append(view)
            queries.append(offered_here)
            targets.append({
                "class_labels": torch.tensor([index[category.casefold()] for category, _ in boxes], dtype=torch.long),
                "boxes": torch.tensor([relative_box(dict(zip(COORDINATES, corners)), frame, scale)
                                       for _, corners in boxes], dtype=torch.float32).reshape(-1, 4)})
        # 2. the processor's tensors, and where each query's scores are
        if kind == "grounding-dino":
            texts = [QUERY_SEPARATOR.join(asked) + "." for asked in queries]
            encoded = processor(images=views, text=texts, padding=True, return_tensors="pt")
            owners = [query_of_tokens(processor.tokenizer, asked, text, model.config.max_text_len)
                      for asked, text in zip(queries, texts)]
            token_query = torch.full(encoded["input_ids"].shape, -1, dtype=torch.long)
            for row, owner in enumerate(owners):
                token_query[row, :len(owner)] = owner
            return {**encoded, "targets": targets, "token_query": token_query}
        encoded = processor(images=views, text=queries, truncation=True, return_tensors="pt")
        return {**encoded, "targets": targets, "queries_per_image": [len(asked) for asked in queries]}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        extras = ("targets", "token_query", "queries_per_image")
        outputs = model(**{key: value for key, value in batch.items() if key not in extras})
        logits = outputs.logits  # (images, boxes, queries) for OWL; (images, boxes, text positions) for DINO
        if "token_query" in batch:
            token_query = batch["token_query"].to(logits.device)
            per_image = [_query_logits(logits[row, :, :token_query.shape[1]], owner)
                         for row, owner in enumerate(token_query)]
        else:
            per_image = [logits[row, :, :count] for row, count in enumerate(batch["queries_per_image"])]
        return detr_loss(per_image, outputs.pred_boxes, batch["targets"])


def _query_logits(logits: Any, owner: Any) -> Any:
    """Grounding DINO's (boxes, text positions) logits as (boxes, queries): a query's best token, as the app
    scores it."""
    import torch

    return torch.stack([logits[:, owner == q].amax(-1) for q in range(int(owner.max()) + 1)], -1)


def detr_loss(logits: list[Any], pred_boxes: Any, targets: list[dict[str, Any]]) -> Any:
    """DETR's set loss with a sigmoid focal classification: ``logits[i]`` (boxes, queries) and ``pred_boxes[i]``
    (boxes, 4: relative cx, cy, w, h) of image ``i`` against its ``targets[i]`` (``class_labels``: query
    indices, ``boxes``: relative cx, cy, w, h). Weighted sum of focal, L1 and GIoU terms over the batch's
    number of labelled boxes (at least 1; an image without boxes teaches only negatives)."""
    import torch
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment
    from transformers.image_transforms import center_to_corners_format
    from transformers.loss.loss_for_object_detection import generalized_box_iou

    count = max(1, sum(len(target["class_labels"]) for target in targets))
    focal = l1 = giou = pred_boxes.new_zeros(())
    for image_logits, boxes, target in zip(logits, pred_boxes, targets):
        labels, wanted = target["class_labels"].to(boxes.device), target["boxes"].to(boxes.device)
        goal = torch.zeros_like(image_logits)
        if len(labels):
            # 1. match: focal-style class cost + L1 + GIoU, one predicted box per labelled box
            with torch.no_grad():
                probability = image_logits.sigmoid()[:, labels]
                class_cost = (FOCAL_ALPHA * (1 - probability) ** FOCAL_GAMMA * -(probability + 1e-8).log()
                              - (1 - FOCAL_ALPHA) * probability ** FOCAL_GAMMA * -(1 - probability + 1e-8).log())
                corners, wanted_corners = center_to_corners_format(boxes), center_to_corners_format(wanted)
                cost = (CLASS_WEIGHT * class_cost + L1_WEIGHT * torch.cdist(boxes, wanted, p=1)
                        - GIOU_WEIGHT * generalized_box_iou(corners, wanted_corners))
            chosen, matched = (torch.as_tensor(i, device=boxes.device)
                               for i in linear_sum_assignment(cost.nan_to_num(1e6).cpu().numpy()))
            goal[chosen, labels[matched]] = 1.0
            # 2. the matched boxes' L1 and GIoU distances
            l1 = l1 + F.l1_loss(boxes[chosen], wanted[matched], reduction="sum")
            giou = giou + (1 - torch.diag(generalized_box_iou(center_to_corners_format(boxes[chosen]),
                                                              center_to_corners_format(wanted[matched])))).sum()
        # 3. every (box, query) pair: sigmoid focal loss
        probability = image_logits.sigmoid()
        cross = F.binary_cross_entropy_with_logits(image_logits, goal, reduction="none")
        p_t = probability * goal + (1 - probability) * (1 - goal)
        alpha_t = FOCAL_ALPHA * goal + (1 - FOCAL_ALPHA) * (1 - goal)
        focal = focal + (alpha_t * cross * (1 - p_t) ** FOCAL_GAMMA).sum()
    return (CLASS_WEIGHT * focal + L1_WEIGHT * l1 + GIOU_WEIGHT * giou) / count
