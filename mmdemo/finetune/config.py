"""The typed configuration of one fine-tuning run, saved as JSON next to its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tasks.spec import task_ids
from ..errors import InvalidInputError
from ..feedback.store import ONLY_CHOICES
from .augment import AUDIO_AUGMENTATIONS, IMAGE_AUGMENTATIONS
from .errors import InvalidModelNameError

# A model name becomes a folder under <data_dir>/models: a letter or digit, then letters, digits,
# '.', '_' or '-', at most 64 characters in all; never '..', a slash or a space.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Augmentations of training batches (mmdemo.finetune.augment): images, then audio. Each task's adapter
# says which it can use and which "default" stands for.
AUGMENTATIONS = IMAGE_AUGMENTATIONS + AUDIO_AUGMENTATIONS
DEFAULT_AUGMENTATION = "default"
# Without --lora/--no-lora, bases of this many million parameters or more train a LoRA adapter: below it a
# full fine-tune fits in ordinary memory and learns more; above it (BLIP large, Whisper small and up) full
# training's gradients and AdamW state (3x the weights) are what runs out.
LORA_DEFAULT_MIN_PARAMS_M = 500


def check_model_name(name: Any) -> str:
    """``name`` if it is a safe model id for a new folder, else ``InvalidModelNameError``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidModelNameError(
            f"The model name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (no slashes, spaces or '..')."
        )
    return name


@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune, on which data, and how. Every field is saved in ``run_config.json``.

    ``dataset``: a folder written by ``mmdemo export --format datasets``; None exports the store's
    feedback for ``task`` (``only``, ``since``, ``val_fraction`` and ``seed`` pick and split it, as
    ``mmdemo export`` does). ``epochs`` passes over the training split, stopping early after
    ``max_steps`` optimizer steps if given. ``eval_campaign`` / ``eval_dataset``: labelled data the
    base did not select, on which the base and the new model are scored (tasks with a metric, see
    ``evaluate.py``); without them the validation split is scored, biased. The checkpoint kept is the epoch with the lowest
    validation loss (the last epoch when the validation split is empty).
    """

    task: str
    base: str                            # catalog id of the model to start from
    name: str                            # id of the new model (a folder under <data_dir>/models)
    dataset: str | None = None           # exported folder; None: export from the feedback store
    only: str | None = None              # store export: approved (default), corrected or all
    since: str | None = None             # store export: feedback saved on or after this date
    val_fraction: float | None = None    # store export: share of inputs for validation (default 0.1)
    seed: int = 0                        # weights, shuffling and the store export's split
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01           # AdamW, on weight matrices only (not biases or norms)
    batch_size: int = 8                  # examples per forward pass on each process
    grad_accum: int = 1                  # forward passes whose gradients add up into one optimizer step
    grad_clip: float = 1.0               # max gradient norm; 0 turns clipping off
    max_length: int = 40                 # target tokens per example, longer ones are cut
    extend: bool = True                  # answers a fixed-head model (ViLT) does not know extend its head
    lora: bool | None = None             # train a LoRA adapter (peft); None: the task's and model size's default
    lora_rank: int = 8                   # r of every LoRA matrix pair
    lora_alpha: float | None = None      # scale numerator (alpha / r); None: 2 x rank
    lora_targets: tuple[str, ...] | None = None  # module names to adapt; None: the model kind's default
    merge: bool = False                  # merge the trained adapter into a full checkpoint (no adapter served)
    checkpoint_every: int = 50           # optimizer steps between resumable checkpoints (and at each epoch end)
    augment: tuple[str, ...] = ()        # training-batch augmentations (AUGMENTATIONS); ("default",): the task's
    eval_campaign: str | None = None     # before/after evaluation on this campaign's labels (held out)
    eval_dataset: str | None = None      # ... or on this exported folder; neither: the validation split
    description: str = ""
    overwrite: bool = False              # replace an earlier fine-tuned model of this name
    device: str | None = None            # filled in by the job: where it trained
    dtype: str | None = None             # filled in by the job: float32, or the autocast dtype on a GPU

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if self.task not in task_ids():
            raise InvalidInputError(f"Unknown task '{self.task}'. Tasks: {', '.join(task_ids())}.")
        if not isinstance(self.base, str) or not self.base:
            raise InvalidInputError("Choose a base model: a catalog model id (see `mmdemo models`).")
        if self.dataset is not None:
            given = [name for name in ("only", "since", "val_fraction") if getattr(self, name) is not None]
            if given:
                raise InvalidInputError(
                    f"{', '.join(given)} apply when exporting from the feedback store; the dataset "
                    f"{self.dataset} already has its rows and split."
                )
        if self.eval_campaign is not None and self.eval_dataset is not None:
            raise InvalidInputError("Evaluate on a campaign or on a dataset, not both.")
        if not isinstance(self.extend, bool):
            raise InvalidInputError(f"extend must be true or false, not {self.extend!r}.")
        if self.lora is not None and not isinstance(self.lora, bool):
            raise InvalidInputError(f"lora must be true, false or unset, not {self.lora!r}.")
        _whole(self.lora_rank, "LoRA rank", 1, 1024)
        if self.lora_alpha is not None:
            _number(self.lora_alpha, "LoRA alpha", 1e-3, 1e5)
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str) or not all(
                    isinstance(t, str) and t and len(t) <= 200 for t in self.lora_targets) or not self.lora_targets:
                raise InvalidInputError("LoRA target modules must be a non-empty list of module names.")
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not isinstance(self.merge, bool):
            raise InvalidInputError(f"merge must be true or false, not {self.merge!r}.")
        if self.lora is False and (self.lora_targets is not None or self.lora_alpha is not None):
            raise InvalidInputError("LoRA targets and alpha apply to LoRA training: drop them or --no-lora.")
        if self.merge and self.lora is False:
            raise InvalidInputError("--merge merges a LoRA adapter: it needs LoRA training (drop --no-lora).")
        if self.only is not None and self.only not in ONLY_CHOICES:
            raise InvalidInputError(f"Unknown filter {self.only!r}; use one of {', '.join(ONLY_CHOICES)}.")
        if self.val_fraction is not None:
            _number(self.val_fraction, "validation fraction", 0.0, 0.99)
        _whole(self.seed, "seed", 0, 2**32 - 1)
        _whole(self.epochs, "number of epochs", 1, 10_000)
        if self.max_steps is not None:
            _whole(self.max_steps, "maximum number of steps", 1, 10_000_000)
        _number(self.lr, "learning rate", 1e-9, 1.0)
        if self.lr <= 0:
            raise InvalidInputError("The learning rate must be above 0.")
        _number(self.weight_decay, "weight decay", 0.0, 1.0)
        _whole(self.batch_size, "batch size", 1, 4096)
        _whole(self.grad_accum, "number of gradient accumulation steps", 1, 4096)
        _whole(self.checkpoint_every, "number of steps between checkpoints", 1, 10_000_000)
        object.__setattr__(self, "augment", check_augment_names(self.augment))
        _number(self.grad_clip, "gradient clipping norm", 0.0, 1e6)
        _whole(self.max_length, "maximum target length", 2, 4096)

    def uses_lora(self, base_params_m: float) -> bool:
        """Whether the run trains a LoRA adapter: as asked, else for bases of ``LORA_DEFAULT_MIN_PARAMS_M``
        million parameters or more, or when LoRA settings (targets, alpha, merge) are given."""
        if self.lora is not None:
            return self.lora
        asked = self.merge or self.lora_targets is not None or self.lora_alpha is not None
        return asked or base_params_m >= LORA_DEFAULT_MIN_PARAMS_M

    @property
    def alpha(self) -> float:
        """LoRA's alpha (the deltas are scaled by alpha / rank): as given, else twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "FinetuneConfig":
        """The config a run saved (``<checkpoint>/run_config.json``), e.g. to run it again."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def check_augment_names(augment: Any) -> tuple[str, ...]:
    """``augment`` as a tuple of known augmentation names (a comma-separated string is split), or
    ``InvalidInputError``; whether the task can use them is the job's check (its adapter's)."""
    if isinstance(augment, str):
        augment = [name.strip() for name in augment.split(",") if name.strip()]
    if not isinstance(augment, (list, tuple)) or not all(isinstance(name, str) for name in augment):
        raise InvalidInputError(f"augment must be a list of augmentation names, not {augment!r}.")
    unknown = [name for name in augment if name not in (*AUGMENTATIONS, DEFAULT_AUGMENTATION)]
    if unknown:
        raise InvalidInputError(f"Unknown augmentation {', '.join(map(repr, unknown))}; use "
                                f"{', '.join(AUGMENTATIONS)} or '{DEFAULT_AUGMENTATION}' (the task's safe set).")
    if DEFAULT_AUGMENTATION in augment and len(augment) > 1:
        raise InvalidInputError(f"'{DEFAULT_AUGMENTATION}' stands for the task's safe set: give it alone or "
                                "name each augmentation.")
    return tuple(dict.fromkeys(augment))


def _number(value: Any, what: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidInputError(f"The {what} must be a number from {low:g} to {high:g}, not {value!r}.")


def _whole(value: Any, what: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(f"The {what} must be a whole number from {low} to {high}, not {value!r}.")
