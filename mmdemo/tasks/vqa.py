"""Visual question answering: ViLT picks from its answer list (top-k with scores), BLIP generates."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from PIL import Image

from ..catalog import ModelSpec
from ..media import MAX_ASPECT_RATIO, MediaLimits, load_image
from ..placement import Placement
from .base import Task, load_kwargs, require_int, require_text
from .bundle import TransformersBundle


@dataclass(frozen=True)
class VqaRequest:
    image: Image.Image
    question: str = ""
    top_k: int = 5
    max_new_tokens: int = 20


class VqaTask(Task):
    task = "visual-question-answering"
    Request = VqaRequest

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> VqaRequest:
        request = VqaRequest(**self._known_fields(inputs))
        return replace(
            request,
            question=require_text(request.question, "question", 500),
            image=load_image(request.image, limits, max_aspect_ratio=MAX_ASPECT_RATIO),
            top_k=require_int(request.top_k, "top_k", 1, 20, what="number of answers"),
            max_new_tokens=require_int(request.max_new_tokens, "max_new_tokens", 1, 100, what="maximum answer length"),
        )

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> TransformersBundle:
        from transformers import AutoProcessor, BlipForQuestionAnswering, ViltForQuestionAnswering

        model_class = {"vilt": ViltForQuestionAnswering, "blip": BlipForQuestionAnswering}[spec.kind]
        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = model_class.from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        return TransformersBundle(model.to(placement.device).eval(), processor, placement)

    def predict(self, model: TransformersBundle, request: VqaRequest) -> dict[str, Any]:
        import torch

        inputs = model.inputs(images=request.image, text=request.question, truncation=True)
        with torch.inference_mode():
            if model.model.config.model_type == "vilt":
                # ViLT is trained with a sigmoid per answer (VQAv2 soft scores): report those.
                scores = model.model(**inputs).logits[0].float().sigmoid()
                k = min(request.top_k, scores.numel())
                top = scores.topk(k)
                labels = model.model.config.id2label
                answers = [
                    {"answer": labels[int(i)], "score": round(float(s), 4)}
                    for s, i in zip(top.values, top.indices)
                ]
                return {"answer": answers[0]["answer"], "answers": answers}
            output = model.model.generate(**inputs, max_new_tokens=request.max_new_tokens)
        answer = model.processor.decode(output[0], skip_special_tokens=True).strip()
        return {"answer": answer, "answers": []}
