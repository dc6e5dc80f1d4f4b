"""Image captioning (``image-to-text``): BLIP, with an optional text prefix to continue."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any, Iterator, Mapping, TYPE_CHECKING

from PIL import Image

from ..catalog import ModelSpec
from ..media import MAX_ASPECT_RATIO, MediaLimits, load_image
from ..placement import Placement
from .base import Task, load_kwargs, require_float, require_int, require_text
from .bundle import TransformersBundle, generation_settings
from .schema import Example, TaskSchema, require_output_text
from .spec import TaskSpec, register_task
from ..tiny import TinyBuilder
from ..tiny.blip import build_blip_caption

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord


@dataclass(frozen=True)
class CaptionRequest:
    image: Image.Image
    prefix: str = ""
    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9

    def settings_key(self) -> tuple:
        return (self.prefix, self.max_new_tokens, self.num_beams, self.do_sample, self.temperature, self.top_p)


class CaptionTask(Task):
    task = "image-to-text"
    Request = CaptionRequest
    batchable = True

    def describe(self, result: dict[str, Any]) -> str:
        return result["text"]

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> CaptionRequest:
        request = CaptionRequest(**self._known_fields(inputs))
        return replace(
            request,
            image=load_image(request.image, limits, max_aspect_ratio=MAX_ASPECT_RATIO),
            prefix=require_text(request.prefix, "prefix", 500, what="start of the caption", required=False),
            max_new_tokens=require_int(request.max_new_tokens, "max_new_tokens", 1, 200, what="maximum caption length"),
            num_beams=require_int(request.num_beams, "num_beams", 1, 10, what="number of beams"),
            do_sample=bool(request.do_sample),
            temperature=require_float(request.temperature, "temperature", 0.01, 5.0),
            top_p=require_float(request.top_p, "top_p", 0.01, 1.0, what="top-p"),
        )

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> TransformersBundle:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = BlipForConditionalGeneration.from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        return TransformersBundle(model.to(placement.device).eval(), processor, placement)

    def predict(self, model: TransformersBundle, request: CaptionRequest) -> dict[str, Any]:
        return self.predict_batch(model, [request])[0]

    def predict_batch(self, model: TransformersBundle, requests: list[CaptionRequest]) -> list[dict[str, Any]]:
        """Requests with the same settings run as one batch; results keep the input order."""
        import torch

        results: dict[int, dict[str, Any]] = {}
        order = sorted(range(len(requests)), key=lambda i: requests[i].settings_key())
        for _, group in groupby(order, key=lambda i: requests[i].settings_key()):
            indices = list(group)
            first = requests[indices[0]]
            images = [requests[i].image for i in indices]
            text = [first.prefix] * len(indices) if first.prefix else None
            inputs = model.inputs(images=images, text=text, padding=True)
            with torch.inference_mode():
                output = model.model.generate(
                    **inputs,
                    **generation_settings(first.max_new_tokens, first.num_beams, first.do_sample,
                                          first.temperature, first.top_p),
                )
            for i, text_out in zip(indices, model.processor.batch_decode(output, skip_special_tokens=True)):
                results[i] = {"text": text_out.strip()}
        return [results[i] for i in range(len(requests))]


# --- feedback: inputs, correction, exported rows --------------------------------------------------


class CaptionSchema(TaskSchema):
    task = "image-to-text"
    text_inputs = {"prefix": False}
    what = "caption"
    suggested = "text"

    def check_output(self, output: dict[str, Any]) -> None:
        require_output_text(self.task, output, "text")

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, Value

        return {"default": dict(image=Image(), text=Value("string"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        text = record.correction if record.correction is not None else record.output.output["text"]
        yield self._example(record, "default", {"text": text}, {"image": record.output.input_media[0]})


# --- the descriptor ------------------------------------------------------------------------------

# Revisions: where a commit is given it is the one transformers itself pins for its pipeline default;
# other entries follow "main" until pinned (pin your own with a catalog file).
SPEC = register_task(TaskSpec(
    id="image-to-text",
    title="Caption",
    description="Caption a photo (BLIP), optionally continuing a start of the caption.",
    aliases=("caption",),
    api_name="caption",
    input_kind="image",
    runner=CaptionTask(),
    schema=CaptionSchema(),
    kinds={"blip": "transformers"},
    models=(
    ModelSpec("blip-caption-base", "image-to-text", "blip", "hf-hub:Salesforce/blip-image-captioning-base",
              params_m=247, description="BLIP base captioner (COCO): fast, good everyday captions."),
    ModelSpec("blip-caption-large", "image-to-text", "blip", "hf-hub:Salesforce/blip-image-captioning-large",
              params_m=470, description="BLIP large captioner: more detailed captions, about 2x slower."),
    ),
    tiny_models=(
    ModelSpec("tiny-blip-caption", "image-to-text", "blip", "tiny:blip-caption", params_m=0.5,
              description="Tiny random BLIP captioner (offline testing; outputs are nonsense)."),
    ),
    tiny_builders={"blip-caption": TinyBuilder(build_blip_caption)},
    tab="mmdemo.ui.caption",
    finetune="mmdemo.finetune.caption:CaptionAdapter",
    order=10,
))
