"""Visual question answering: ViLT picks from its answer list (top-k with scores), BLIP generates."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, TYPE_CHECKING

from PIL import Image

from ..catalog import ModelSpec
from ..media import MAX_ASPECT_RATIO, MediaLimits, load_image
from ..placement import Placement
from .base import Task, load_kwargs, require_int, require_text
from .bundle import TransformersBundle
from .schema import Example, TaskSchema, require_output_text
from .spec import TaskSpec, register_task
from ..tiny import TinyBuilder
from ..tiny.blip import build_blip_vqa
from ..tiny.vilt import build_vilt_vqa

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord


@dataclass(frozen=True)
class VqaRequest:
    image: Image.Image
    question: str = ""
    top_k: int = 5
    max_new_tokens: int = 20


class VqaTask(Task):
    task = "visual-question-answering"
    Request = VqaRequest

    def describe(self, result: dict[str, Any]) -> str:
        return result["answer"] + "".join(f"\n  {a['score']:.3f}  {a['answer']}" for a in result["answers"])

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


# --- feedback: inputs, correction, exported rows --------------------------------------------------


class VqaSchema(TaskSchema):
    task = "visual-question-answering"
    text_inputs = {"question": True}
    what = "answer"
    suggested = "answer"

    def check_output(self, output: dict[str, Any]) -> None:
        require_output_text(self.task, output, "answer")

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, Value

        return {"default": dict(image=Image(), question=Value("string"), answer=Value("string"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        answer = record.correction if record.correction is not None else out.output["answer"]
        row = {"question": out.inputs["question"], "answer": answer}
        yield self._example(record, "default", row, {"image": out.input_media[0]})


# --- the descriptor ------------------------------------------------------------------------------

# Revisions: where a commit is given it is the one transformers itself pins for its pipeline default;
# other entries follow "main" until pinned (pin your own with a catalog file).
SPEC = register_task(TaskSpec(
    id="visual-question-answering",
    title="Ask",
    description="Ask a question about an image (ViLT picks an answer, BLIP writes one).",
    aliases=("vqa",),
    api_name="vqa",
    input_kind="image",
    runner=VqaTask(),
    schema=VqaSchema(),
    kinds={"vilt": "transformers", "blip": "transformers"},
    models=(
    ModelSpec("vilt-vqa", "visual-question-answering", "vilt", "hf-hub:dandelin/vilt-b32-finetuned-vqa",
              revision="d0a1f6a", params_m=118,
              description="ViLT fine-tuned on VQAv2: picks from 3,129 answers, with scores."),
    ModelSpec("blip-vqa-base", "visual-question-answering", "blip", "hf-hub:Salesforce/blip-vqa-base",
              params_m=385, description="BLIP VQA: generates a free-form short answer."),
    ),
    tiny_models=(
    ModelSpec("tiny-vilt-vqa", "visual-question-answering", "vilt", "tiny:vilt-vqa", params_m=0.3,
              description="Tiny random ViLT VQA (offline testing)."),
    ModelSpec("tiny-blip-vqa", "visual-question-answering", "blip", "tiny:blip-vqa", params_m=0.5,
              description="Tiny random BLIP VQA (offline testing)."),
    ),
    tiny_builders={"blip-vqa": TinyBuilder(build_blip_vqa), "vilt-vqa": TinyBuilder(build_vilt_vqa)},
    tab="mmdemo.ui.vqa",
    finetune="mmdemo.finetune.vqa:VqaAdapter",
    order=20,
))
