"""Text-to-image with diffusers pipelines (Stable Diffusion, SD-Turbo, SDXL) through AutoPipeline."""

from __future__ import annotations

import json

import copy
import queue
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, TYPE_CHECKING

from ..catalog import ModelSpec
from ..errors import InvalidFeedbackError, InvalidInputError, RequestInterrupted
from ..media import MediaLimits
from ..placement import Placement
from .base import Task, load_kwargs, require_float, require_int, require_text
from .schema import Example, MAX_IMAGE_RATING, TaskSchema, digest
from .spec import TaskSpec, register_task
from ..tiny import TinyBuilder
from ..tiny.stable_diffusion import build_stable_diffusion

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000  # the prompt and the negative prompt each


@dataclass(frozen=True)
class TextToImageRequest:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    num_images: int = 1
    seed: int | None = None  # None: a random seed, reported back
    progress: ProgressCallback | None = None
    should_stop: Callable[[], bool] | None = None  # checked after each step: True stops the request


@dataclass
class DiffusersBundle:
    pipeline: Any  # the loaded pipeline; calls run on views of it (see call_view)
    placement: Placement
    size_multiple: int
    spare_views: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)

    @contextmanager
    def call_view(self) -> Iterator[Any]:
        """A pipeline for one call: the loaded modules, shared (no weights copied, nothing moved), with a
        scheduler and tokenizers of its own. Schedulers keep the call's timesteps and step index on
        themselves, tokenizers their padding settings and the pipeline its guidance scale, so concurrent
        calls on one pipeline would overwrite each other's. A view is reused once its call is over: there
        are as many as calls ever ran at once."""
        try:
            view = self.spare_views.get_nowait()
        except queue.Empty:
            view = _pipeline_view(self.pipeline)
        try:
            yield view
        finally:
            self.spare_views.put(view)


def _pipeline_view(pipeline: Any) -> Any:
    from transformers import PreTrainedTokenizerBase

    components = {name: copy.deepcopy(part) if isinstance(part, PreTrainedTokenizerBase) else part
                  for name, part in pipeline.components.items()}
    components["scheduler"] = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    _, options = pipeline._get_signature_keys(pipeline)  # settings such as requires_safety_checker
    view = type(pipeline)(**components, **{name: pipeline.config[name] for name in options if name in pipeline.config})
    view.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return view


class TextToImageTask(Task):
    task = "text-to-image"
    Request = TextToImageRequest

    def describe(self, result: dict[str, Any]) -> str:
        text = f"seed {result['seed']}: " + ", ".join(map(str, result["images"]))
        return text + "".join(f"\nwarning: {w}" for w in result["warnings"])

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> TextToImageRequest:
        request = TextToImageRequest(**self._known_fields(inputs))
        seed = request.seed
        if seed is None or seed == "" or (isinstance(seed, (int, float)) and seed < 0):
            seed = random.randint(0, MAX_SEED)  # -1 or empty also means "random", as in most UIs
        prompt = require_text(request.prompt, "prompt", MAX_PROMPT_CHARS)
        negative_prompt = require_text(request.negative_prompt, "negative_prompt", MAX_PROMPT_CHARS, required=False)
        width = require_int(request.width, "width", 64, 2048)
        height = require_int(request.height, "height", 64, 2048)
        if width * height > limits.max_image_pixels:
            raise InvalidInputError(f"{width}x{height} is larger than the {limits.max_image_pixels:,}-pixel limit.",
                                    "width")
        return replace(
            request,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=require_int(request.steps, "steps", 1, 150, what="number of steps"),
            guidance=require_float(request.guidance, "guidance", 0.0, 30.0, what="guidance scale"),
            width=width,
            height=height,
            num_images=require_int(request.num_images, "num_images", 1, 8, what="number of images"),
            seed=require_int(seed, "seed", 0, MAX_SEED),
        )

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> DiffusersBundle:
        from diffusers import AutoPipelineForText2Image

        kwargs = load_kwargs(spec, placement)
        kwargs.pop("trust_remote_code")  # diffusers loads no remote code unless a custom pipeline is named
        if spec.variant and placement.dtype != "float32" and spec.source_scheme == "hf-hub":
            kwargs["variant"] = spec.variant
        pipeline = AutoPipelineForText2Image.from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        return diffusers_bundle(pipeline.to(placement.device), placement)

    def predict(self, model: DiffusersBundle, request: TextToImageRequest) -> dict[str, Any]:
        import torch

        multiple = model.size_multiple
        if request.width % multiple or request.height % multiple:
            raise InvalidInputError(
                f"Width and height must be multiples of {multiple} for this model; got "
                f"{request.width}x{request.height}.", "width"
            )
        generator_device = "cpu" if model.placement.device == "mps" else model.placement.device
        # One generator per image, seeded seed + i: image i is made again alone from its own seed.
        seeds = image_seeds(request.seed, request.num_images)
        generators = [torch.Generator(device=generator_device).manual_seed(seed) for seed in seeds]

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if request.progress is not None:
                request.progress(step + 1, request.steps)
            if request.should_stop is not None and step + 1 < request.steps and request.should_stop():
                raise RequestInterrupted(f"Interrupted at step {step + 1}/{request.steps}.")
            return callback_kwargs

        arguments: dict[str, Any] = dict(
            prompt=request.prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images,
            generator=generators,
            callback_on_step_end=on_step_end,
        )
        if request.negative_prompt:
            arguments["negative_prompt"] = request.negative_prompt
        with model.call_view() as pipeline, torch.inference_mode():
            warnings = self._prompt_warnings(pipeline, request)
            images = pipeline(**arguments).images
        return {
            "images": images,
            "seed": request.seed,
            "seeds": seeds,
            "settings": {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "steps": request.steps,
                "guidance": request.guidance,
                "width": request.width,
                "height": request.height,
                "num_images": request.num_images,
                "seed": request.seed,
            },
            "warnings": warnings,
        }

    @staticmethod
    def _prompt_warnings(pipeline: Any, request: TextToImageRequest) -> list[str]:
        warnings = []
        tokenizer = getattr(pipeline, "tokenizer", None)
        if tokenizer is not None:
            limit = tokenizer.model_max_length
            for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
                if text and len(tokenizer(text).input_ids) > limit:
                    warnings.append(
                        f"The {name} is longer than the text encoder's {limit} tokens; the end was cut off."
                    )
        if request.negative_prompt and request.guidance <= 1.0:
            warnings.append("The negative prompt has no effect when guidance is 1 or less.")
        return warnings


def diffusers_bundle(pipeline: Any, placement: Placement) -> DiffusersBundle:
    """A loaded pipeline (on ``placement.device``) in the form ``predict`` takes."""
    pipeline.set_progress_bar_config(disable=True)
    # The pipelines check sizes against 8 and the VAE's own downscaling factor.
    multiple = max(8, int(getattr(pipeline, "vae_scale_factor", 8)))
    return DiffusersBundle(pipeline, placement, multiple)


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each image of a request: ``seed``, ``seed + 1``, ... (wrapping past ``MAX_SEED``)."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


# --- feedback: inputs, correction, exported rows --------------------------------------------------


class TextToImageSchema(TaskSchema):
    task = "text-to-image"
    media_input = None
    text_inputs = {"prompt": True, "negative_prompt": False}
    output_media = "images"
    what = "image ratings"
    correction_is_text = False
    column_docs = {"image": "an image the model generated (PNG)"}

    def parse_correction(self, text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise InvalidFeedbackError('A text-to-image correction is JSON: {"image_ratings": [1-5 or null per '
                                       'image], "preferred": an image index or null}.') from None

    def input_key(self, media_refs: list[str], text: dict[str, Any]) -> str:
        return digest(self.task, text.get("prompt", ""), text.get("negative_prompt", ""))

    def clean_correction(self, correction: Any, images: int) -> Any:
        count = images
        if not isinstance(correction, Mapping):
            raise InvalidFeedbackError(
                'A text-to-image correction is {"image_ratings": [1-5 per image], "preferred": image index}.'
            )
        unknown = sorted(set(correction) - {"image_ratings", "preferred"})
        if unknown:
            raise InvalidFeedbackError(
                f"Unexpected key(s) in the text-to-image correction: {', '.join(map(str, unknown))}; "
                "use image_ratings and preferred."
            )
        ratings = correction.get("image_ratings")
        if ratings is not None:
            if not isinstance(ratings, (list, tuple)) or len(ratings) != count:
                raise InvalidFeedbackError(
                    f"image_ratings must list one rating (1-{MAX_IMAGE_RATING}, or none) for each of the "
                    f"{count} image(s)."
                )
            for rating in ratings:
                if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)
                                           or not 1 <= rating <= MAX_IMAGE_RATING):
                    raise InvalidFeedbackError(
                        f"An image rating must be a whole number from 1 to {MAX_IMAGE_RATING}, not {rating!r}."
                    )
            ratings = list(ratings) if any(r is not None for r in ratings) else None
        preferred = correction.get("preferred")
        if preferred is not None:
            if count < 2:
                raise InvalidFeedbackError("A preferred image can only be chosen when several images were made.")
            if isinstance(preferred, bool) or not isinstance(preferred, int) or not 0 <= preferred < count:
                raise InvalidFeedbackError(
                    f"The preferred image must be an index from 0 to {count - 1}, not {preferred!r}."
                )
        if ratings is None and preferred is None:
            raise InvalidFeedbackError(
                "The text-to-image correction is empty: rate at least one image or choose the preferred one."
            )
        return {"image_ratings": ratings, "preferred": preferred}

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, Value

        prompt = {"prompt": Value("string"), "negative_prompt": Value("string")}
        return {
            "ratings": dict(**prompt, image=Image(), rating=Value("int8"), preferred=Value("bool")),
            "preferences": dict(**prompt, chosen=Image(), rejected=Image(), reason=Value("string")),
        }

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        prompt = {"prompt": out.inputs["prompt"], "negative_prompt": out.inputs.get("negative_prompt", "")}
        correction = record.correction or {}
        ratings = correction.get("image_ratings") or [None] * len(out.output_media)
        preferred = correction.get("preferred")
        for index, ref in enumerate(out.output_media):
            row = {**prompt, "rating": ratings[index], "preferred": preferred == index}
            yield self._example(record, "ratings", row, {"image": ref})
        # Preference pairs: the preferred image over each other one; without a choice, any image
        # rated higher than another.
        images = out.output_media
        if preferred is not None:
            pairs = [(preferred, other, "preferred") for other in range(len(images)) if other != preferred]
        else:
            pairs = [(a, b, "ratings") for a in range(len(images)) for b in range(len(images))
                     if ratings[a] is not None and ratings[b] is not None and ratings[a] > ratings[b]]
        for chosen, rejected, reason in pairs:
            if images[chosen] == images[rejected]:
                continue  # two identical images: no preference to learn
            yield self._example(record, "preferences", {**prompt, "reason": reason},
                                {"chosen": images[chosen], "rejected": images[rejected]})


# --- the descriptor ------------------------------------------------------------------------------

# Revisions: where a commit is given it is the one transformers itself pins for its pipeline default;
# other entries follow "main" until pinned (pin your own with a catalog file).
SPEC = register_task(TaskSpec(
    id="text-to-image",
    title="Create",
    description="Create images from a prompt (Stable Diffusion pipelines).",
    aliases=("t2i", "generate"),
    api_name="text_to_image",
    input_kind="text",
    runner=TextToImageTask(),
    schema=TextToImageSchema(),
    kinds={"diffusers": "diffusers"},
    models=(
    ModelSpec("sd-turbo", "text-to-image", "diffusers", "hf-hub:stabilityai/sd-turbo", variant="fp16",
              params_m=1290, defaults={"steps": 1, "guidance": 0.0, "width": 512, "height": 512},
              description="SD-Turbo: 512px images in 1-4 steps, no guidance."),
    ModelSpec("sdxl-base", "text-to-image", "diffusers", "hf-hub:stabilityai/stable-diffusion-xl-base-1.0",
              variant="fp16", params_m=3470, defaults={"steps": 30, "guidance": 7.0, "width": 1024, "height": 1024},
              description="Stable Diffusion XL base: higher quality 1024px images, slower."),
    ),
    tiny_models=(
    ModelSpec("tiny-stable-diffusion", "text-to-image", "diffusers", "tiny:stable-diffusion", params_m=1.0,
              defaults={"steps": 4, "guidance": 5.0, "width": 64, "height": 64},
              description="Tiny random Stable Diffusion pipeline (offline testing; images are noise)."),
    ),
    tiny_builders={"stable-diffusion": TinyBuilder(build_stable_diffusion)},
    tab="mmdemo.ui.text_to_image",
    finetune="mmdemo.finetune.text_to_image:TextToImageAdapter",
    order=30,
))
