"""The per-task fine-tuning interface, :class:`FinetuneAdapter` (see :mod:`.adapters` for the list of them).

A module of its own, below the adapter modules (``caption``, ``vqa``...) that subclass it and below
:mod:`.adapters`, which imports them to list them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ..catalog import Catalog, ModelSpec
from ..errors import InvalidInputError
from ..placement import Placement
from .augment import IMAGE_AUGMENTATIONS, augment_images
from .config import DEFAULT_AUGMENTATION
from .errors import UnsupportedBaseError

if TYPE_CHECKING:
    from .config import FinetuneConfig
    from .data import TrainingData
    from .evaluate import TaskEvaluation


# LoRA target modules (peft matches a module whose name is, or ends with ".", one of them)
ATTENTION_MLP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # CLIP, Whisper
BERT_TARGETS = ("query", "key", "value", "dense")  # BERT-like text encoders (BLIP's text model, ViLT)
# BLIP's vision attention (qkv, projection) and MLP, and its BERT text model; never the LM head, which is tied
# to the word embeddings (merging a LoRA on it silently changes the embeddings too)
BLIP_TARGETS = ("qkv", "projection", "fc1", "fc2", *BERT_TARGETS)


class FinetuneAdapter(ABC):
    task: ClassVar[str]
    kinds: ClassVar[frozenset[str]]        # catalog kinds this adapter can train
    columns: ClassVar[tuple[str, ...]]     # exported dataset columns it reads
    # how the task is scored on labelled data (mmdemo.finetune.evaluate); None: the task has no metric yet
    evaluation: ClassVar[TaskEvaluation | None] = None
    # the column an image folder's caption (metadata ``text``) fills; None: the task takes no image folders
    text_column: ClassVar[str | None] = None
    # training-batch augmentations (mmdemo.finetune.augment) the task can use, and those safe for any of
    # its data (what "default" stands for); the others are used only when named
    augmentations: ClassVar[tuple[str, ...]] = ()
    default_augmentations: ClassVar[tuple[str, ...]] = ()
    # LoRA (--lora): kind -> the module names it adapts by default, and the modules trained whole beside it
    lora_targets: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    lora_modules_to_save: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # True: the adapter adds and saves its own LoRA (text-to-image: diffusers' UNet recipe); the job's
    # generic peft wrapping (jobs._lora_plan) leaves it alone
    manages_lora: ClassVar[bool] = False

    @abstractmethod
    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        """(model, processor) of ``spec`` from ``location``: float32 weights on ``placement.device``."""

    @abstractmethod
    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        """A batch of ``rows`` (column -> values) as the model's keyword arguments, ``labels`` included."""

    def prepare_data(self, data: TrainingData) -> TrainingData:
        """The exported rows as training examples (e.g. grouped); unchanged by default."""
        return data

    def prepare_model(self, model: Any, processor: Any, data: TrainingData, config: FinetuneConfig) -> dict[str, Any]:
        """Fit the loaded model to ``data`` before training (e.g. a larger answer head); returns what it
        changed, for metrics.json. Raises a typed error when the data does not fit the model."""
        return {}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        """The mean loss of ``batch`` (a scalar tensor)."""
        return model(**batch).loss

    def check_augmentations(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The augmentations ``requested`` ("default": :attr:`default_augmentations`), or
        ``InvalidInputError`` naming those the task cannot use."""
        if requested == (DEFAULT_AUGMENTATION,):
            return self.default_augmentations
        refused = [name for name in requested if name not in self.augmentations]
        if refused:
            usable = ", ".join(self.augmentations) or "none"
            raise InvalidInputError(f"{self.task} cannot use the augmentation(s) {', '.join(refused)} "
                                    f"(usable: {usable}).")
        return requested

    def augment(self, rows: dict[str, list[Any]], ops: tuple[str, ...], generator: Any) -> dict[str, list[Any]]:
        """Training ``rows`` augmented with ``ops`` before :meth:`collate` (the images by default); the
        labels are never touched."""
        if "image" in rows and any(op in IMAGE_AUGMENTATIONS for op in ops):
            return {**rows, "image": augment_images(rows["image"], ops, generator)}
        return rows

    def augment_batch(self, batch: dict[str, Any], ops: tuple[str, ...], generator: Any) -> dict[str, Any]:
        """A collated training batch augmented with ``ops`` (e.g. masked spectrogram features); as is by default."""
        return batch

    def save(self, model: Any, processor: Any, folder: Path) -> None:
        """Write a checkpoint that the task's ``load`` (``mmdemo.tasks``) reads back."""
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    def training_spec(self, spec: ModelSpec, catalog: Catalog) -> ModelSpec:
        """The catalog model that trains for base ``spec``: itself, unless it serves another format (a
        faster-whisper model trains its transformers twin)."""
        return spec

    def serving_bundle(self, model: Any, processor: Any, spec: ModelSpec, placement: Placement) -> Any:
        """The loaded ``model`` in the form the task's ``predict`` takes (to score the base before training)."""
        from ..tasks.bundle import TransformersBundle

        return TransformersBundle(model.eval(), processor, placement)

    def convert_for_serving(self, base: ModelSpec, folder: Path) -> None:
        """Turn the saved checkpoint in ``folder`` into the format ``base`` serves (nothing by default)."""

    def check_feedback(self, store: Any, only: str) -> None:
        """Refuse at once (before a job is queued) the store's ``only`` feedback when the adapter would keep
        none of it (``InvalidDatasetError``); nothing to check by default."""

    def load_saved(self, saved: ModelSpec, folder: Path, base_location: str, placement: Placement) -> Any:
        """The checkpoint saved in ``folder`` loaded as the app serves it (to score it after training)."""
        from ..tasks import get_task

        return get_task(saved.task).load(saved, str(folder), placement)

    def catalog_entry(self, base: ModelSpec, folder: Path) -> dict[str, Any]:
        """Fields the new model's catalog entry adds to the base's (e.g. ``adapter_of`` for a LoRA folder)."""
        return {}

    def check_base(self, spec: ModelSpec) -> None:
        if spec.adapter_of:
            raise UnsupportedBaseError(
                f"Model '{spec.id}' is a LoRA adapter of '{spec.adapter_of}': fine-tune '{spec.adapter_of}' "
                "(or a merged model, --merge) instead.")
        if spec.task != self.task or spec.kind not in self.kinds:
            raise UnsupportedBaseError(
                f"Model '{spec.id}' ({spec.task}, kind {spec.kind}) cannot be fine-tuned for {self.task}: "
                f"choose a model that serves {self.task} and is of kind {' or '.join(sorted(self.kinds))}."
            )
