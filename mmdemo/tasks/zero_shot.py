"""Zero-shot image classification with CLIP (softmax over labels) or SigLIP (also per-label sigmoid).

Label embeddings depend only on the labels and the template, so they are computed once per label set
and cached with the loaded model; a call then costs one image forward pass.
"""

from __future__ import annotations

import json

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, TYPE_CHECKING

from PIL import Image

from ..catalog import ModelSpec
from ..errors import InvalidFeedbackError, InvalidInputError
from ..media import MAX_ASPECT_RATIO, MediaLimits, load_image
from ..placement import Placement
from .base import Task, check_characters, load_kwargs, require_text
from .bundle import TransformersBundle
from .schema import Example, TaskSchema, check_correction_size
from .spec import TaskSpec, register_task
from ..tiny import TinyBuilder
from ..tiny.clip import build_clip, build_siglip

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord

MAX_LABELS = 100
MAX_LABEL_CHARS = 100
MAX_LABELS_TEXT_CHARS = MAX_LABELS * (MAX_LABEL_CHARS + 2)  # the labels as one text: each label and ", "
MAX_TEMPLATE_CHARS = 200
LABEL_SLOT = "{}"  # where the template takes the label
TEXT_CACHE_SIZE = 64
MULTI_LABEL_KINDS = frozenset({"siglip"})  # trained with a per-pair sigmoid loss


@dataclass(frozen=True)
class ZeroShotRequest:
    image: Image.Image
    labels: tuple[str, ...] | str = ()
    template: str = "a photo of a {}."
    multi_label: bool = False


@dataclass
class ZeroShotBundle(TransformersBundle):
    kind: str = "clip"
    text_cache: "OrderedDict[tuple, Any]" = field(default_factory=OrderedDict)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)


def parse_labels(labels: Any) -> tuple[str, ...]:
    """Labels from a list or a comma/newline separated string: stripped, deduplicated, in order."""
    if labels is None:
        items: list[str] = []
    elif isinstance(labels, (list, tuple)):
        if len(labels) > MAX_LABELS:
            raise InvalidInputError(f"{len(labels)} labels given; the limit is {MAX_LABELS}.", "labels")
        items = [require_text(item, "labels", MAX_LABEL_CHARS, what="label", required=False) for item in labels]
    else:
        text = require_text(labels, "labels", MAX_LABELS_TEXT_CHARS, what="list of labels", required=False)
        items = re.split(r"[,\n]", text)
    unique: dict[str, str] = {}
    for item in items:
        label = check_characters(" ".join(item.split()), "labels", field="labels")
        if label and label.casefold() not in unique:
            if len(label) > MAX_LABEL_CHARS:
                raise InvalidInputError(f"The label '{label[:30]}...' is longer than {MAX_LABEL_CHARS} characters.",
                                        "labels")
            unique[label.casefold()] = label
    if not unique:
        raise InvalidInputError("Please give at least one label (separate labels with commas or new lines).", "labels")
    if len(unique) > MAX_LABELS:
        raise InvalidInputError(f"{len(unique)} labels given; the limit is {MAX_LABELS}.", "labels")
    return tuple(unique.values())


def parse_template(template: Any) -> str:
    """A template with one ``{}`` where the label goes and no other braces (labels are put in by plain
    substitution, never ``str.format``)."""
    text = require_text(template, "template", MAX_TEMPLATE_CHARS)
    if text.count(LABEL_SLOT) != 1:
        raise InvalidInputError(f'The template must contain "{LABEL_SLOT}" exactly once, where the label goes.',
                                "template")
    if "{" in text.replace(LABEL_SLOT, "") or "}" in text.replace(LABEL_SLOT, ""):
        raise InvalidInputError(f'The template may contain braces only as "{LABEL_SLOT}", where the label goes.',
                                "template")
    return text


def fill_template(template: str, label: str) -> str:
    return template.replace(LABEL_SLOT, label)


class ZeroShotTask(Task):
    task = "zero-shot-image-classification"
    Request = ZeroShotRequest
    batchable = True

    def describe(self, result: dict[str, Any]) -> str:
        return "\n".join(f"{item['score']:.3f}  {item['label']}" for item in result["labels"])

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> ZeroShotRequest:
        request = ZeroShotRequest(**self._known_fields(inputs))
        template = parse_template(request.template)
        if request.multi_label and spec.kind not in MULTI_LABEL_KINDS:
            raise InvalidInputError(
                f"Multi-label scores need a sigmoid-trained model such as SigLIP; {spec.id} only ranks labels "
                "against each other (single-label).", "multi_label"
            )
        return replace(
            request,
            labels=parse_labels(request.labels),
            template=template,
            multi_label=bool(request.multi_label),
            image=load_image(request.image, limits, max_aspect_ratio=MAX_ASPECT_RATIO),
        )

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> ZeroShotBundle:
        from transformers import AutoProcessor, CLIPModel, SiglipModel

        model_class = {"clip": CLIPModel, "siglip": SiglipModel}[spec.kind]
        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = model_class.from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        return ZeroShotBundle(model.to(placement.device).eval(), processor, placement, kind=spec.kind)

    def predict(self, model: ZeroShotBundle, request: ZeroShotRequest) -> dict[str, Any]:
        return self.predict_batch(model, [request])[0]

    def predict_batch(self, model: ZeroShotBundle, requests: list[ZeroShotRequest]) -> list[dict[str, Any]]:
        """One image forward pass for the whole batch; label embeddings come from the cache."""
        import torch

        pixels = model.inputs(images=[r.image for r in requests])
        with torch.inference_mode():
            image_embeds = _normalise(_features(model.model.get_image_features(**pixels)))
            scale = model.model.logit_scale.exp()
            bias = getattr(model.model, "logit_bias", None)
            results = []
            for row, request in enumerate(requests):
                text_embeds = self._label_embeddings(model, request.labels, request.template)
                logits = (image_embeds[row : row + 1] @ text_embeds.T)[0] * scale
                if bias is not None:
                    logits = logits + bias
                scores = logits.float().sigmoid() if request.multi_label else logits.float().softmax(-1)
                ranked = sorted(zip(request.labels, scores.tolist()), key=lambda pair: -pair[1])
                results.append({
                    "labels": [{"label": label, "score": round(score, 4)} for label, score in ranked],
                    "multi_label": request.multi_label,
                })
        return results

    def _label_embeddings(self, model: ZeroShotBundle, labels: tuple[str, ...], template: str):
        key = (labels, template)
        with model.cache_lock:
            if key in model.text_cache:
                model.text_cache.move_to_end(key)
                return model.text_cache[key]
        texts = [fill_template(template, label) for label in labels]
        padding = "max_length" if model.kind == "siglip" else True  # SigLIP was trained on padded text
        tokens = model.inputs(text=texts, padding=padding, truncation=True)
        embeds = _normalise(_features(model.model.get_text_features(**tokens)))
        with model.cache_lock:
            model.text_cache[key] = embeds
            while len(model.text_cache) > TEXT_CACHE_SIZE:
                model.text_cache.popitem(last=False)
        return embeds


def _features(output: Any):
    return output if hasattr(output, "norm") else output.pooler_output


def _normalise(tensor):
    return tensor / tensor.norm(p=2, dim=-1, keepdim=True)


# --- feedback: inputs, correction, exported rows --------------------------------------------------


class ZeroShotSchema(TaskSchema):
    task = "zero-shot-image-classification"
    text_inputs = {"labels": True, "template": False}
    what = "labels"
    correction_is_text = False

    def parse_correction(self, text: str) -> Any:
        """A JSON list of labels, or labels separated by commas (one of them may start with "[")."""
        try:
            return json.loads(text)
        except ValueError:
            return text

    def suggestion(self, output: Mapping[str, Any]) -> str | None:
        return ", ".join(f"{item['label']} ({item['score']:.2f})" for item in output.get("labels", [])[:5])

    def clean_text_input(self, name: str, value: Any) -> Any:
        if name == "labels":
            return list(parse_labels(value))
        return super().clean_text_input(name, value)

    def check_output(self, output: dict[str, Any]) -> None:
        labels = output.get("labels")
        if not isinstance(labels, list) or not labels or not all(
            isinstance(item, Mapping) and isinstance(item.get("label"), str) for item in labels
        ):
            raise InvalidInputError(f"The {self.task} output needs 'labels': a list of {{label, score}}.")

    def clean_correction(self, correction: Any, images: int) -> Any:
        items = [correction] if isinstance(correction, str) else correction
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise InvalidFeedbackError("The corrected labels must be a label or a list of labels (text).")
        if not "".join(items).strip():
            raise InvalidFeedbackError(
                "The corrected labels are empty: choose or type the right label(s), or leave the correction out."
            )
        for item in items:
            check_characters(item, f"corrected {self.what}", InvalidFeedbackError)
        check_correction_size(sum(len(item.encode("utf-8")) for item in items), self.what)
        try:
            return list(parse_labels(correction))  # as the task reads labels: commas separate them
        except InvalidInputError as exc:
            raise InvalidFeedbackError(str(exc)) from None

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, List, Value

        return {"default": dict(image=Image(), labels=List(Value("string")),
                                     candidate_labels=List(Value("string")), template=Value("string"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        # Without a correction the accepted answer is the model's top label.
        labels = record.correction if record.correction is not None else [out.output["labels"][0]["label"]]
        row = {"labels": list(labels), "candidate_labels": list(out.inputs["labels"]),
               "template": out.inputs.get("template")}  # None: the model's default template
        yield self._example(record, "default", row, {"image": out.input_media[0]})


# --- the descriptor ------------------------------------------------------------------------------

# Revisions: where a commit is given it is the one transformers itself pins for its pipeline default;
# other entries follow "main" until pinned (pin your own with a catalog file).
SPEC = register_task(TaskSpec(
    id="zero-shot-image-classification",
    title="Classify",
    description="Classify an image with labels you type (CLIP, SigLIP).",
    aliases=("zero-shot", "classify"),
    api_name="zero_shot",
    input_kind="image",
    runner=ZeroShotTask(),
    schema=ZeroShotSchema(),
    kinds={"clip": "transformers", "siglip": "transformers"},
    models=(
    ModelSpec("clip-vit-base-patch32", "zero-shot-image-classification", "clip",
              "hf-hub:openai/clip-vit-base-patch32", revision="3d74acf", params_m=151,
              description="OpenAI CLIP ViT-B/32: the classic zero-shot classifier (single-label)."),
    ModelSpec("siglip-base", "zero-shot-image-classification", "siglip",
              "hf-hub:google/siglip-base-patch16-224", params_m=203,
              defaults={"template": "This is a photo of {}."},
              description="SigLIP base: sigmoid scores, good for multi-label."),
    ),
    tiny_models=(
    ModelSpec("tiny-clip", "zero-shot-image-classification", "clip", "tiny:clip", params_m=0.3,
              description="Tiny random CLIP (offline testing)."),
    ModelSpec("tiny-siglip", "zero-shot-image-classification", "siglip", "tiny:siglip", params_m=0.3,
              defaults={"template": "This is a photo of {}."},
              description="Tiny random SigLIP (offline testing)."),
    ),
    tiny_builders={"clip": TinyBuilder(build_clip), "siglip": TinyBuilder(build_siglip)},
    tab="mmdemo.ui.zero_shot",
    finetune="mmdemo.finetune.zero_shot:ZeroShotAdapter",
    order=40,
))
