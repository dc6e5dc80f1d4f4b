"""Zero-shot object detection: an image and text queries ("cat, remote control") -> boxes with a label and a
score each, in the image's own pixel coordinates. OWL-ViT, OWLv2 and Grounding DINO.

Every kind is post-processed alike from the raw logits: a box takes the query it scores highest on, and
Grounding DINO (which scores the tokens of one text holding all queries) scores a query by its best token.
Requests that share their queries run as one batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from itertools import groupby
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from PIL import Image

from ..catalog import ModelSpec
from ..errors import InvalidFeedbackError, InvalidInputError
from ..media import MAX_ASPECT_RATIO, MediaLimits, load_image
from ..registry import Placement
from ..tiny import TinyBuilder
from ..tiny.detection import build_grounding_dino, build_owlv2, build_owlvit
from .base import Task, check_characters, load_kwargs, require_float, require_int
from .bundle import TransformersBundle
from .schema import Example, TaskSchema, check_correction_size
from .spec import TaskSpec, register_task
from .zero_shot import MAX_LABEL_CHARS, parse_labels

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord

TASK = "zero-shot-object-detection"
MAX_QUERIES = 20  # OWL models encode each query on its own: cost grows with their number
MAX_BOXES = 300  # returned per image, and kept in a correction
DEFAULT_MAX_BOXES = 100
DEFAULT_THRESHOLD = 0.1  # the models' own default (catalog entries may set theirs)
MAX_MODEL_SIDE = 1333  # the processors resize to at most this (Grounding DINO's longest edge); larger is wasted
QUERY_SEPARATOR = ". "  # Grounding DINO reads its queries as one text: "cat. remote control."
COORDINATES = ("xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class DetectionRequest:
    image: Image.Image
    queries: tuple[str, ...] | str = ()
    threshold: float = DEFAULT_THRESHOLD
    max_boxes: int = DEFAULT_MAX_BOXES


@dataclass
class DetectionBundle(TransformersBundle):
    kind: str = "owlvit"


def parse_queries(queries: Any) -> tuple[str, ...]:
    """What to look for, from a list or a comma/newline separated string (as labels are read); refusals are
    about the ``queries`` field."""
    try:
        parsed = parse_labels(queries)
    except InvalidInputError as exc:
        raise InvalidInputError(str(exc).replace("labels", "queries").replace("label", "query"), "queries") from None
    if len(parsed) > MAX_QUERIES:
        raise InvalidInputError(f"{len(parsed)} queries given; the limit is {MAX_QUERIES}.", "queries")
    return parsed



def model_class(kind: str) -> Any:
    """The transformers class of a detection model ``kind`` (serving and fine-tuning load the same one)."""
    from transformers import GroundingDinoForObjectDetection, Owlv2ForObjectDetection, OwlViTForObjectDetection

    return {"owlvit": OwlViTForObjectDetection, "owlv2": Owlv2ForObjectDetection,
            "grounding-dino": GroundingDinoForObjectDetection}[kind]

class DetectionTask(Task):
    task = TASK
    Request = DetectionRequest
    batchable = True

    def describe(self, result: dict[str, Any]) -> str:
        lines = [f"{item['score']:.3f}  {item['label']}  " + " ".join(f"{item['box'][c]:g}" for c in COORDINATES)
                 for item in result["boxes"]]
        return "\n".join(lines) or f"No box scored {result['threshold']} or more."

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> DetectionRequest:
        request = DetectionRequest(**self._known_fields(inputs))
        return replace(
            request,
            queries=parse_queries(request.queries),
            threshold=require_float(request.threshold, "threshold", 0.0, 1.0),
            max_boxes=require_int(request.max_boxes, "max_boxes", 1, MAX_BOXES, what="maximum number of boxes"),
            image=load_image(request.image, limits),
        )

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> DetectionBundle:
        from transformers import AutoProcessor

        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = model_class(spec.kind).from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        return DetectionBundle(model.to(placement.device).eval(), processor, placement, kind=spec.kind)

    def predict(self, model: DetectionBundle, request: DetectionRequest) -> dict[str, Any]:
        return self.predict_batch(model, [request])[0]

    def predict_batch(self, model: DetectionBundle, requests: list[DetectionRequest]) -> list[dict[str, Any]]:
        """One forward pass per group of requests with the same queries."""
        results: list[dict[str, Any]] = [{} for _ in requests]
        order = sorted(range(len(requests)), key=lambda i: requests[i].queries)
        for queries, group in groupby(order, key=lambda i: requests[i].queries):
            indices = list(group)
            for index, result in zip(indices, self._detect(model, queries, [requests[i] for i in indices])):
                results[index] = result
        return results

    def _detect(self, model: DetectionBundle, queries: tuple[str, ...],
                requests: list[DetectionRequest]) -> list[dict[str, Any]]:
        import torch

        views = [model_view(request.image) for request in requests]
        images = [view for view, _ in views]
        if model.kind == "grounding-dino":
            text = QUERY_SEPARATOR.join(queries) + "."
            token_query = self._query_of_tokens(model, queries, text)
            inputs = model.inputs(images=images, text=[text] * len(images))
        else:
            inputs = model.inputs(images=images, text=[list(queries)] * len(images), truncation=True)
        with torch.inference_mode():
            outputs = model.model(**inputs)
        probabilities = outputs.logits.float().sigmoid()  # (images, boxes, queries or text positions)
        if model.kind == "grounding-dino":  # text positions, padded to max_text_len
            probabilities = probabilities[:, :, : len(token_query)]
            per_query = torch.stack([probabilities[:, :, token_query == q].amax(-1) for q in range(len(queries))], -1)
        else:
            per_query = probabilities
        scores, best = per_query.max(-1)
        boxes = outputs.pred_boxes.float()  # (cx, cy, w, h), relative to the image the model saw
        results = []
        for row, (request, (view, scale)) in enumerate(zip(requests, views)):
            frame = model_frame(model.kind, view)
            found = []
            for score, query, box in zip(scores[row].tolist(), best[row].tolist(), boxes[row].tolist()):
                if score < request.threshold:
                    continue
                corners = pixel_box(box, frame, scale, request.image.size)
                if corners is not None:
                    found.append({"label": queries[query], "score": round(score, 4), "box": corners})
            found.sort(key=lambda item: -item["score"])
            width, height = request.image.size
            results.append({"boxes": found[: request.max_boxes], "width": width, "height": height,
                            "threshold": request.threshold})
        return results

    @staticmethod
    def _query_of_tokens(model: DetectionBundle, queries: tuple[str, ...], text: str):
        with model.processor_lock:
            return query_of_tokens(model.processor.tokenizer, queries, text, model.model.config.max_text_len)


def query_of_tokens(tokenizer: Any, queries: tuple[str, ...] | list[str], text: str, limit: int):
    """For each token of ``text`` (Grounding DINO's queries joined by ``QUERY_SEPARATOR``, as its tokenizer
    encodes it), the query it belongs to (-1: none: special tokens and separators). ``limit``: the most tokens
    the model reads."""
    import torch

    starts, position = [], 0
    for query in queries:
        starts.append((position, position + len(query)))
        position += len(query) + len(QUERY_SEPARATOR)
    encoded = tokenizer(text, return_offsets_mapping=True)
    if len(encoded["input_ids"]) > limit:
        raise InvalidInputError(f"The queries make {len(encoded['input_ids'])} tokens; this model reads at "
                                f"most {limit}. Give fewer or shorter queries.", "queries")
    owner = [-1] * len(encoded["input_ids"])
    for token, (start, end) in enumerate(encoded["offset_mapping"]):
        for query, (first, last) in enumerate(starts):
            if end > start and first <= start < last:
                owner[token] = query
    return torch.tensor(owner)


def model_view(image: Image.Image) -> tuple[Image.Image, float]:
    """The image the model sees and its scale from the original: shrunk to a long side of at most
    ``MAX_MODEL_SIDE`` and padded at the right or bottom (not centred: box corners then need no offset) to an
    aspect ratio of at most ``MAX_ASPECT_RATIO``, which the processors cope with."""
    width, height = image.size
    scale = min(1.0, MAX_MODEL_SIDE / max(width, height))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    padded = (max(width, math.ceil(height / MAX_ASPECT_RATIO)), max(height, math.ceil(width / MAX_ASPECT_RATIO)))
    if padded != (width, height):
        canvas = Image.new("RGB", padded, (255, 255, 255))
        canvas.paste(image, (0, 0))
        image = canvas
    return image, scale


def model_frame(kind: str, view: Image.Image) -> tuple[int, int]:
    """The size that a model's relative boxes are fractions of, for the image it saw (``model_view``): OWLv2
    pads the image to a square at the right or bottom, the others keep it."""
    return (max(view.size),) * 2 if kind == "owlv2" else view.size


def relative_box(corners: Mapping[str, float], frame: tuple[int, int], scale: float) -> tuple[float, ...]:
    """Corners in the original image's pixels as the model's relative ``(cx, cy, w, h)`` on ``frame`` (the
    inverse of :func:`pixel_box`)."""
    (frame_width, frame_height) = frame
    xmin, ymin, xmax, ymax = (corners[c] * scale for c in COORDINATES)
    return ((xmin + xmax) / 2 / frame_width, (ymin + ymax) / 2 / frame_height, (xmax - xmin) / frame_width,
            (ymax - ymin) / frame_height)


def pixel_box(box: list[float], frame: tuple[int, int], scale: float, size: tuple[int, int]) -> dict[str, float] | None:
    """A relative ``(cx, cy, w, h)`` box on ``frame`` as corners in the original image's pixels (``size``),
    clipped to it; None when nothing of it is left inside."""
    cx, cy, w, h = box
    (frame_width, frame_height), (width, height) = frame, size
    xmin = min(max((cx - w / 2) * frame_width / scale, 0.0), width)
    xmax = min(max((cx + w / 2) * frame_width / scale, 0.0), width)
    ymin = min(max((cy - h / 2) * frame_height / scale, 0.0), height)
    ymax = min(max((cy + h / 2) * frame_height / scale, 0.0), height)
    corners = dict(zip(COORDINATES, (round(v, 1) for v in (xmin, ymin, xmax, ymax))))
    if corners["xmax"] <= corners["xmin"] or corners["ymax"] <= corners["ymin"]:
        return None
    return corners


# --- feedback: inputs, correction, exported rows --------------------------------------------------


def clean_boxes(boxes: Any, what: str = "corrected boxes") -> list[dict[str, Any]]:
    """A list of ``{label, box: {xmin, ymin, xmax, ymax}}`` (extra keys such as ``score`` dropped): labels are
    text, coordinates finite pixels with ``xmin < xmax`` and ``ymin < ymax``, at most ``MAX_BOXES`` boxes. An
    empty list is a correction too: nothing in the image is any of the queries."""
    if not isinstance(boxes, (list, tuple)):
        raise InvalidFeedbackError(f"The {what} must be a list of {{label, box: {{xmin, ymin, xmax, ymax}}}}.")
    if len(boxes) > MAX_BOXES:
        raise InvalidFeedbackError(f"The {what} are {len(boxes)}; the limit is {MAX_BOXES}.")
    cleaned = []
    for number, item in enumerate(boxes, 1):
        if not isinstance(item, Mapping) or not isinstance(item.get("box"), Mapping):
            raise InvalidFeedbackError(f"Box {number} of the {what} must be "
                                       "{label, box: {xmin, ymin, xmax, ymax}}.")
        label = item.get("label")
        if not isinstance(label, str) or not " ".join(label.split()):
            raise InvalidFeedbackError(f"Box {number} of the {what} needs a label (text).")
        label = check_characters(" ".join(label.split()), f"label of box {number}", InvalidFeedbackError)
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidFeedbackError(f"The label of box {number} is longer than {MAX_LABEL_CHARS} characters.")
        corners = {}
        for name in COORDINATES:
            value = item["box"].get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidFeedbackError(f"Box {number} ({label}): {name} must be a pixel coordinate (a number, "
                                           f"0 or more), not {value!r}.")
            corners[name] = round(float(value), 1)
        if corners["xmin"] >= corners["xmax"] or corners["ymin"] >= corners["ymax"]:
            raise InvalidFeedbackError(f"Box {number} ({label}) is empty: it needs xmin < xmax and ymin < ymax.")
        cleaned.append({"label": label, "box": corners})
    return cleaned


def check_inside(boxes: list[dict[str, Any]], width: int, height: int) -> None:
    """Refuse a box that reaches outside a ``width`` x ``height`` image."""
    for number, item in enumerate(boxes, 1):
        box = item["box"]
        if box["xmax"] > width or box["ymax"] > height:
            raise InvalidFeedbackError(f"Box {number} ({item['label']}, xmax {box['xmax']:g}, ymax {box['ymax']:g}) "
                                       f"reaches outside the {width}x{height} image.")


class DetectionSchema(TaskSchema):
    task = TASK
    text_inputs = {"queries": True}
    what = "boxes"
    correction_is_text = False
    column_docs = {
        "objects": "the boxes: bbox [x, y, width, height] in pixels (COCO), category (the label text), area, id",
        "queries": "what the model was asked to find",
    }
    card_notes = ("Without a correction a row holds the boxes the model found (above its threshold); with one, "
                  "the boxes a person kept, fixed or drew.",)

    def parse_correction(self, text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise InvalidFeedbackError('A detection correction is JSON: [{"label": "cat", "box": {"xmin": 10, '
                                       '"ymin": 20, "xmax": 110, "ymax": 90}}, ...] (pixels).') from None

    def suggestion(self, output: Mapping[str, Any]) -> str | None:
        boxes = output.get("boxes") or []
        return ", ".join(f"{item['label']} ({item['score']:.2f})" for item in boxes[:5]) or "no boxes"

    def clean_text_input(self, name: str, value: Any) -> Any:
        if name == "queries":
            return list(parse_queries(value))
        return super().clean_text_input(name, value)

    def check_output(self, output: dict[str, Any]) -> None:
        boxes, width, height = output.get("boxes"), output.get("width"), output.get("height")
        if not isinstance(width, int) or not isinstance(height, int) or not isinstance(boxes, list):
            raise InvalidInputError(f"The {self.task} output needs 'boxes' (a list), 'width' and 'height'.")
        try:
            check_inside(clean_boxes(boxes, "boxes found"), width, height)
        except InvalidFeedbackError as exc:
            raise InvalidInputError(f"The {self.task} output is not valid: {exc}") from None

    def clean_correction(self, correction: Any, images: int) -> Any:
        boxes = clean_boxes(correction)
        check_correction_size(len(json.dumps(boxes).encode("utf-8")), self.what)
        return boxes

    def check_correction(self, correction: Any, output: Mapping[str, Any]) -> None:
        """Refuse a corrected box that reaches outside the image (its size is the recorded output's)."""
        check_inside(correction, output["width"], output["height"])

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, List, Value

        objects = List({"id": Value("int64"), "area": Value("float32"), "bbox": List(Value("float32"), length=4),
                        "category": Value("string")})
        return {"default": dict(image=Image(), width=Value("int32"), height=Value("int32"), objects=objects,
                                queries=List(Value("string")))}

    def examples(self, record: "FeedbackRecord") -> Iterator[Example]:
        """One row per record, in the shape of the object-detection fine-tuning guide (CPPE-5): COCO boxes
        ``[x, y, width, height]``; the category is the label text (open vocabulary)."""
        out = record.output
        width, height = out.output["width"], out.output["height"]
        boxes = record.correction if record.correction is not None else out.output["boxes"]
        objects = []
        for number, item in enumerate(boxes):
            box = item["box"]
            xmin, ymin = box["xmin"], box["ymin"]
            xmax, ymax = min(box["xmax"], width), min(box["ymax"], height)  # corrections are checked, not clipped
            if xmax <= xmin or ymax <= ymin:
                continue
            w, h = round(xmax - xmin, 1), round(ymax - ymin, 1)
            objects.append({"id": number, "area": round(w * h, 2), "bbox": [xmin, ymin, w, h],
                            "category": item["label"]})
        row = {"width": width, "height": height, "objects": objects, "queries": list(out.inputs["queries"])}
        yield self._example(record, "default", row, {"image": out.input_media[0]})


# --- the descriptor ------------------------------------------------------------------------------

# Revisions: OWL-ViT's is the one transformers pins for its pipeline default; the others follow "main" until
# pinned (pin your own with a catalog file).
SPEC = register_task(TaskSpec(
    id=TASK,
    title="Detect",
    description="Find objects you name in an image, with a box each (OWL-ViT, OWLv2, Grounding DINO).",
    aliases=("detect", "detection"),
    api_name="detect",
    input_kind="image",
    runner=DetectionTask(),
    schema=DetectionSchema(),
    kinds={"owlv2": "transformers", "owlvit": "transformers", "grounding-dino": "transformers"},
    models=(
        ModelSpec("owlv2-base", TASK, "owlv2", "hf-hub:google/owlv2-base-patch16-ensemble", params_m=155,
                  defaults={"threshold": 0.2},
                  description="Google OWLv2 base (ensemble): open-vocabulary boxes, the better OWL."),
        ModelSpec("owlvit-base-patch32", TASK, "owlvit", "hf-hub:google/owlvit-base-patch32", revision="cbc355f",
                  params_m=153, defaults={"threshold": 0.1},
                  description="Google OWL-ViT B/32: fast open-vocabulary boxes."),
        ModelSpec("grounding-dino-tiny", TASK, "grounding-dino", "hf-hub:IDEA-Research/grounding-dino-tiny",
                  params_m=172, defaults={"threshold": 0.35},
                  description="Grounding DINO tiny: phrase-grounded boxes, strong on common objects."),
    ),
    tiny_models=(
        ModelSpec("tiny-owlv2", TASK, "owlv2", "tiny:owlv2", params_m=0.3,
                  description="Tiny random OWLv2 (offline testing; boxes are random)."),
        ModelSpec("tiny-owlvit", TASK, "owlvit", "tiny:owlvit", params_m=0.3,
                  description="Tiny random OWL-ViT (offline testing)."),
        ModelSpec("tiny-grounding-dino", TASK, "grounding-dino", "tiny:grounding-dino", params_m=0.3,
                  description="Tiny random Grounding DINO (offline testing)."),
    ),
    tiny_builders={"owlv2": TinyBuilder(build_owlv2), "owlvit": TinyBuilder(build_owlvit),
                   "grounding-dino": TinyBuilder(build_grounding_dino)},
    tab="mmdemo.ui.detection",
    finetune="mmdemo.finetune.detection:DetectionAdapter",
    order=60,
))
