"""Image captioning (``image-to-text``): BLIP, with an optional text prefix to continue."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any, Mapping

from PIL import Image

from ..catalog import ModelSpec
from ..media import MAX_ASPECT_RATIO, MediaLimits, load_image
from ..placement import Placement
from .base import Task, load_kwargs, require_float, require_int, require_text
from .bundle import TransformersBundle, generation_settings


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
