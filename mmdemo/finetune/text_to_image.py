"""Fine-tuning text-to-image: a LoRA on the UNet of a Stable Diffusion pipeline (or the whole UNet), from the
images people rated highly and from a team's own (image, caption) pairs.

Training data (:func:`kept_for_training`): an image the model made is trained on when its rating is
``MIN_RATING`` (4) or 5 of 5; an unrated one when it is the preferred image of its batch or its record has a
thumbs up. Rows of a dataset of one's own pairs (an image folder with ``metadata.jsonl`` / ``metadata.csv``,
see :func:`mmdemo.finetune.data.load_image_folder`) are all kept. Training only on the model's own best outputs
is self-distillation. The export's ``preferences`` config (chosen / rejected pairs) is left for preference
training; this adapter reads the ``ratings`` config.

The loss is the diffusers recipe: VAE latents times the VAE's scaling factor, Gaussian noise at random DDPM
timesteps, the UNet's prediction against the noise (``epsilon``), the velocity (``v_prediction``) or the
latents (``sample``) as the scheduler is configured, mean squared error. Validation batches draw their noise
and timesteps from a fixed seed, so validation losses compare between epochs.

Saved: without ``merge``, the LoRA alone (``pytorch_lora_weights.safetensors``, diffusers' format, served on
its base pipeline: the catalog entry names it in ``adapter_of``); with ``merge`` (or full fine-tuning, ``lora``
false) a whole pipeline (``save_pretrained``).

The evaluation (:class:`TextToImageEvaluation`): each validation prompt rendered with a fixed seed by the base
and by the new model; the CLIP score of prompt against image (the catalog's first zero-shot CLIP model;
100 x cosine similarity, at least 0, as torchmetrics' CLIPScore), the denoising loss of the prompt's reference
image, and ``validation_grid.png`` (base row over new row) in the model folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..catalog import ModelSpec
from ..errors import InvalidInputError
from ..placement import Placement
from ..tasks.base import load_kwargs
from .base import FinetuneAdapter
from .data import TrainingData
from .errors import InvalidDatasetError, UnsupportedBaseError
from .evaluate import TaskEvaluation, average, image_of, undecoded
from .labels import CampaignInput

TASK = "text-to-image"
MIN_RATING = 4                                  # of 5: an image rated this or better is trained on
TRAINING_RULE = (f"an image rated {MIN_RATING} or 5, or an unrated image that was preferred or whose record has a "
                 "thumbs up (every row of an image-folder dataset)")
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet's attention projections
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"       # diffusers' save_lora_weights file name
GRID_FILE = "validation_grid.png"
VALIDATION_SEED = 0        # noise and timesteps of validation batches, and the seed of evaluation images
GRID_PROMPTS = 8           # columns of the validation grid at most


def kept_for_training(rating: int | None, preferred: bool | None, thumbs: int | None, output_id: str | None) -> bool:
    """Whether an exported row is a training example (see :data:`TRAINING_RULE`)."""
    if output_id is None:  # a pair of one's own dataset, not a rated output
        return True
    if rating is not None:
        return rating >= MIN_RATING
    return bool(preferred) or thumbs == 1


def nothing_kept(what: str) -> str:
    """The message for data without a training example: ``what`` was looked at, and the rule."""
    return (f"None of the {what} is highly rated: training takes {TRAINING_RULE}. Rate the best images "
            f"{MIN_RATING} or 5 (or give a thumbs up), or train on a dataset of your own (image, caption) pairs "
            "(--dataset).")


@dataclass
class DiffusionParts:
    """The frozen parts of a pipeline that turn a (prompt, image) pair into the UNet's inputs and target."""

    pipeline: Any              # the loaded pipeline; its ``unet`` is the model that trains
    noise_scheduler: Any       # DDPM, from the pipeline's scheduler config (betas, prediction type)
    image_size: int            # the UNet's sample size in pixels

    def pixels(self, images: Iterable[Any]) -> Any:
        """RGB images resized and centre-cropped to the model's size, in [-1, 1], on the VAE's device."""
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        size = (self.image_size, self.image_size)
        arrays = [np.asarray(ImageOps.fit(image.convert("RGB"), size, Image.Resampling.BICUBIC), dtype=np.float32)
                  for image in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return batch.to(self.pipeline.vae.device)


def diffusion_parts(pipeline: Any) -> DiffusionParts:
    from diffusers import DDPMScheduler

    scale = int(getattr(pipeline, "vae_scale_factor", 8))
    return DiffusionParts(pipeline, DDPMScheduler.from_config(pipeline.scheduler.config),
                          int(pipeline.unet.config.sample_size) * scale)


def denoising_batch(parts: DiffusionParts, images: list[Any], prompts: list[str],
                    generator: Any = None) -> dict[str, Any]:
    """The UNet's inputs and target for (image, prompt) pairs: noisy latents, timesteps, prompt embeddings and
    the target the scheduler's prediction type asks for. ``generator`` (a CPU ``torch.Generator``) fixes the
    noise and timesteps; None draws them from torch's global generator."""
    import torch

    pipeline, scheduler = parts.pipeline, parts.noise_scheduler
    device = pipeline.vae.device
    tokenizer = pipeline.tokenizer
    with torch.no_grad():
        # 1. the images' latents, scaled as the UNet sees them
        posterior = pipeline.vae.encode(parts.pixels(images).to(pipeline.vae.dtype)).latent_dist
        latents = _sample(posterior, generator) * pipeline.vae.config.scaling_factor
        # 2. noise at random timesteps
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # 3. the prompts' embeddings
        ids = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(pipeline.text_encoder.device)
        encoded = pipeline.text_encoder(ids)[0]
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif prediction == "sample":
        target = latents
    else:
        raise UnsupportedBaseError(f"The scheduler's prediction type {prediction!r} cannot be trained.")
    return {"noisy_latents": noisy, "timesteps": timesteps, "encoder_hidden_states": encoded, "target": target}


def _sample(posterior: Any, generator: Any) -> Any:
    import torch

    noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
    return posterior.mean + posterior.std * noise.to(posterior.mean.device)


def denoising_loss(unet: Any, batch: dict[str, Any]) -> Any:
    """Mean squared error of the UNet's prediction for ``batch`` (:func:`denoising_batch`)."""
    import torch.nn.functional as F

    predicted = unet(batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"]).sample
    return F.mse_loss(predicted.float(), batch["target"].float())


def validation_loss(pipeline: Any, image: Any, prompt: str) -> float:
    """The denoising loss of one (image, prompt) pair on a served pipeline, with the fixed validation noise."""
    import torch

    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    with torch.inference_mode():
        batch = denoising_batch(diffusion_parts(pipeline), [image], [prompt], generator)
        return round(float(denoising_loss(pipeline.unet, batch)), 6)


# --- the evaluation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationPrompt:
    """A prompt rendered by base and new model; ``reference``: an image it should give (a kept row), or None."""

    prompt: str
    negative_prompt: str = ""
    reference: Any = None
    group: str | None = None
    suggested_by: str | None = None
    output_ids: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[Any, ...]:
        return (self.reference,) if self.reference is not None else ()


class TextToImageEvaluation(TaskEvaluation):
    """CLIP score of each validation prompt against the image rendered from it (fixed seed), and the
    validation loss of the prompts' reference images."""

    task = TASK
    metrics = (("CLIP score", "clip_score", "prompts"), ("validation loss", "val_loss", "references"))
    export_columns = ("image", "prompt", "negative_prompt", "rating", "preferred", "thumbs", "output_id")
    media = "prompt"

    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[ValidationPrompt]:
        """One example per prompt (first-seen order), its reference the first kept image (accepted / corrected
        groups do not apply: a rating is not a corrected answer)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for row in rows:
            key = (row["prompt"], row.get("negative_prompt") or "")
            entry = found.setdefault(key, {"reference": None})
            if entry["reference"] is None and kept_for_training(row.get("rating"), row.get("preferred"),
                                                                row.get("thumbs"), row.get("output_id")):
                entry["reference"] = _image_bytes(row["image"])
        return [ValidationPrompt(prompt, negative, image_of(entry["reference"]) if entry["reference"] else None)
                for (prompt, negative), entry in found.items()]

    def examples_from_export(self, path: Path) -> list[ValidationPrompt]:
        """Every row of both splits of an export (its ``ratings``) or of an image folder."""
        from .data import load_export

        data = load_export(Path(path), self.task, self.export_columns, text_column="prompt")
        rows = [row for split in (data.train, data.validation) for row in undecoded(split)]
        return self.examples_from_rows(rows, split_groups=False)

    def examples_from_campaign(self, store: Any, campaign: str) -> list[Any]:
        raise InvalidDatasetError("Text-to-image is evaluated on prompts: give an exported dataset (--dataset) "
                                  "or use the validation split, not a campaign.")

    def example_from_campaign(self, item: CampaignInput, campaign: str) -> Any:
        raise InvalidDatasetError("Text-to-image is not evaluated on campaigns.")

    def accepted_answer(self, output: dict[str, Any]) -> Any:
        return output.get("images")

    def task_inputs(self, example: ValidationPrompt) -> dict[str, Any]:
        """The prompt, one image, the fixed seed (the model's other settings are its defaults)."""
        return {"prompt": example.prompt, "negative_prompt": example.negative_prompt, "num_images": 1,
                "seed": VALIDATION_SEED}

    def prediction(self, result: dict[str, Any]) -> Any:
        return result["images"][0]

    def loaded_model_answers(self, spec: Any, bundle: Any, registry: Any = None) -> Callable[[Any], Any]:
        """``{"image", "val_loss", "clip_score"}`` per example from a loaded pipeline; the CLIP score needs
        ``registry`` (its catalog's CLIP model), else it is None."""
        render = super().loaded_model_answers(spec, bundle)

        def answer(example: ValidationPrompt) -> dict[str, Any]:
            image = render(example)
            loss = None if example.reference is None else validation_loss(bundle.pipeline, example.reference,
                                                                           example.prompt)
            return {"image": image, "val_loss": loss, "clip_score": clip_score(registry, example.prompt, image)}

        return answer

    def served_model_answers(self, registry: Any, model_id: str) -> Callable[[Any], Any]:
        """As :meth:`loaded_model_answers`, on the registry's copy of ``model_id``."""
        spec = registry.catalog.get(model_id, TASK)

        def answer(example: ValidationPrompt) -> dict[str, Any]:
            found = registry.call(model_id, lambda bundle: self.loaded_model_answers(spec, bundle)(example), TASK)
            return {**found, "clip_score": clip_score(registry, example.prompt, found["image"])}

        return answer

    def summarise(self, scored: list[tuple[ValidationPrompt, dict[str, Any]]]) -> dict[str, Any]:
        clip = [found["clip_score"] for _, found in scored if found["clip_score"] is not None]
        losses = [found["val_loss"] for _, found in scored if found["val_loss"] is not None]
        return {"clip_score": average(clip), "prompts": len(clip), "val_loss": average(losses),
                "references": len(losses)}

    def save_artifacts(self, folder: Path, examples: list[Any], predictions: dict[str, list[Any]]) -> dict[str, Any]:
        """``validation_grid.png``: the first prompts as columns, one row per model (base, then new)."""
        from PIL import Image

        rows = [[found["image"] for found in predictions[name][:GRID_PROMPTS]] for name in ("base", "new")
                if predictions.get(name)]
        if not rows or not rows[0]:
            return {}
        width, height = rows[0][0].size
        grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
        for y, row in enumerate(rows):
            for x, image in enumerate(row):
                grid.paste(image.convert("RGB").resize((width, height)), (x * width, y * height))
        grid.save(Path(folder) / GRID_FILE)
        return {"grid": {"file": GRID_FILE, "rows": [n for n in ("base", "new") if predictions.get(n)],
                         "prompts": [example.prompt for example in examples[:len(rows[0])]],
                         "seed": VALIDATION_SEED}}


def clip_model_id(catalog: Any) -> str | None:
    """The catalog's first zero-shot CLIP model (the one that scores prompts against images), if any."""
    for spec in catalog.for_task("zero-shot-image-classification"):
        if spec.kind == "clip":
            return spec.id
    return None


def clip_score(registry: Any, prompt: str, image: Any) -> float | None:
    """100 x the cosine similarity of ``prompt`` and ``image`` in the registry's CLIP (at least 0, as
    torchmetrics' CLIPScore); None without a registry or a CLIP model in its catalog."""
    model_id = clip_model_id(registry.catalog) if registry is not None else None
    if model_id is None:
        return None

    def score(bundle: Any) -> float:
        import torch

        tokenizer = bundle.processor.tokenizer
        inputs = bundle.processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt", padding=True,
                                  truncation=True, max_length=tokenizer.model_max_length)
        with torch.inference_mode():
            out = bundle.model(**inputs.to(bundle.model.device))
            cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        return round(100 * max(cosine, 0.0), 4)

    return registry.call(model_id, score, "zero-shot-image-classification")


def _image_bytes(value: Any) -> bytes:
    """An undecoded image cell as bytes (its file when only a path is stored)."""
    if value.get("bytes") is not None:
        return value["bytes"]
    return Path(value["path"]).read_bytes()


# --- fine-tuning -------------------------------------------------------------------------------------------


class TextToImageAdapter(FinetuneAdapter):
    """LoRA (default) or full fine-tuning of a Stable Diffusion pipeline's UNet; see the module's docstring."""

    manages_lora = True  # prepare_model adds the UNet LoRA; save writes it in diffusers' format
    task = TASK
    kinds = frozenset({"diffusers"})
    columns = TextToImageEvaluation.export_columns
    text_column = "prompt"            # an image folder's caption (``text``) is the prompt
    evaluation = TextToImageEvaluation()

    def __init__(self) -> None:
        self.lora_config: Any = None  # the LoRA the UNet trains (None: the whole UNet trains)
        self.merge = False

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        """The UNet (the model that trains) and the frozen rest of the pipeline (:class:`DiffusionParts`)."""
        import torch
        from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

        kwargs = load_kwargs(spec, placement)
        kwargs.pop("trust_remote_code")
        pipeline = AutoPipelineForText2Image.from_pretrained(location, dtype=torch.float32, **kwargs)
        if not isinstance(pipeline, StableDiffusionPipeline):
            raise UnsupportedBaseError(
                f"Model '{spec.id}' is a {type(pipeline).__name__}; text-to-image fine-tuning trains Stable "
                "Diffusion pipelines (one text encoder and a UNet), e.g. SD 1.x, 2.x and SD-Turbo, not SDXL.")
        pipeline = pipeline.to(placement.device)
        pipeline.set_progress_bar_config(disable=True)
        for frozen in (pipeline.vae, pipeline.text_encoder):
            frozen.requires_grad_(False).eval()
        return pipeline.unet, diffusion_parts(pipeline)

    def prepare_data(self, data: TrainingData) -> TrainingData:
        """Only the rows :func:`kept_for_training` keeps; a clear error when no training row is left."""
        from .data import quiet_progress

        def keep(split: Any) -> Any:
            with quiet_progress():
                return split.filter(lambda r, p, t, o: [kept_for_training(*row) for row in zip(r, p, t, o)],
                                    input_columns=["rating", "preferred", "thumbs", "output_id"], batched=True,
                                    keep_in_memory=True)

        train, validation = keep(data.train), keep(data.validation)
        if train.num_rows == 0:
            raise InvalidDatasetError(nothing_kept(f"{data.train.num_rows} text-to-image training rows"))
        return TrainingData(train, validation, {**data.source, "rule": TRAINING_RULE}, data.fingerprint,
                            {"train": train.num_rows, "validation": validation.num_rows})

    def check_feedback(self, store: Any, only: str) -> None:
        """Refuse feedback in which no image is kept for training (:data:`TRAINING_RULE`)."""
        from ..feedback.schemas import schema_for

        schema, records = schema_for(TASK), 0
        for record in store.iter_records(TASK, only=only):
            records += 1
            for example in schema.examples(record):
                row = example.row
                if example.config == "ratings" and kept_for_training(row["rating"], row["preferred"], record.thumbs,
                                                                     record.output.id):
                    return
        raise InvalidDatasetError(nothing_kept(f"images of the {records} {only} text-to-image feedback records"))

    def prepare_model(self, model: Any, processor: Any, data: TrainingData, config: Any) -> dict[str, Any]:
        """A LoRA on the UNet's attention (``config.lora`` None or true; the base frozen), or the whole UNet."""
        self.merge = config.merge
        if config.lora is False:
            model.requires_grad_(True)
            return {"trained": "unet", "trainable_params": _count(model, trainable=True)}
        from peft import LoraConfig

        model.requires_grad_(False)
        targets = list(config.lora_targets or DEFAULT_LORA_TARGETS)
        self.lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                                      init_lora_weights="gaussian", target_modules=targets)
        try:
            model.add_adapter(self.lora_config)
        except ValueError as exc:
            raise InvalidInputError(f"The LoRA target modules {', '.join(targets)} do not fit this UNet: {exc}") \
                from None
        return {"trained": "lora", "lora": {"rank": config.lora_rank, "alpha": self.lora_config.lora_alpha,
                                            "targets": targets, "merged": config.merge},
                "trainable_params": _count(model, trainable=True)}

    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        """The UNet's inputs and target (:func:`denoising_batch`); a validation pass (the model in eval mode)
        draws the same noise and timesteps every epoch."""
        import torch

        generator = None if model.training else torch.Generator().manual_seed(VALIDATION_SEED)
        return denoising_batch(processor, rows["image"], rows["prompt"], generator)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return denoising_loss(model, batch)

    def save(self, model: Any, processor: Any, folder: Path) -> None:
        """The LoRA alone (diffusers' file), or a whole pipeline: merged LoRA or fully trained UNet."""
        from diffusers import StableDiffusionPipeline

        pipeline = processor.pipeline
        if self.lora_config is not None and not self.merge:
            from peft.utils import get_peft_model_state_dict

            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=get_peft_model_state_dict(model),
                unet_lora_adapter_metadata=self.lora_config.to_dict())
            return
        if self.lora_config is not None:  # merged into a copy: the training UNet keeps its adapter
            merged = copy.deepcopy(model)
            merged.fuse_lora()
            merged.unload_lora()
            pipeline = type(pipeline)(**{**pipeline.components, "unet": merged.eval()},
                                      requires_safety_checker=False)
        pipeline.save_pretrained(folder)

    def serving_bundle(self, model: Any, processor: Any, spec: ModelSpec, placement: Placement) -> Any:
        from ..tasks.text_to_image import diffusers_bundle

        model.eval()
        return diffusers_bundle(processor.pipeline, placement)

    def load_saved(self, saved: ModelSpec, folder: Path, base_location: str, placement: Placement) -> Any:
        """A LoRA folder is loaded onto its base pipeline (diffusers' ``load_lora_weights``); a whole
        pipeline as the app loads it."""
        if not (Path(folder) / LORA_WEIGHTS_FILE).is_file():
            return super().load_saved(saved, folder, base_location, placement)
        from ..tasks import get_task

        bundle = get_task(TASK).load(saved, base_location, placement)
        bundle.pipeline.load_lora_weights(str(folder))
        return bundle

    def catalog_entry(self, base: ModelSpec, folder: Path) -> dict[str, Any]:
        """A LoRA folder is served on its base: ``adapter_of`` names it."""
        return {"adapter_of": base.id} if (Path(folder) / LORA_WEIGHTS_FILE).is_file() else {}


def _count(model: Any, trainable: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)

