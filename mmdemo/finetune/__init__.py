"""Fine-tuning: turn the feedback people gave into new checkpoints that the registry serves.

>>> from mmdemo.finetune import FinetuneConfig, FinetuneJob
>>> config = FinetuneConfig("image-to-text", base="blip-caption-base", name="blip-products", epochs=3)
>>> result = FinetuneJob(config, settings).run()      # <data_dir>/models/blip-products/, in the catalog

* ``config.py``: :class:`FinetuneConfig`, the typed run configuration (saved as ``run_config.json``).
* ``adapters.py``: the per-task interface (:class:`FinetuneAdapter`); ``caption.py`` trains BLIP
  captioners. Another task is one more adapter module.
* ``evaluate.py``: the before/after evaluation every task shares; a task's metric is its adapter's
  ``evaluation`` (a :class:`~mmdemo.finetune.evaluate.TaskEvaluation` beside the adapter, e.g. in ``vqa.py``).
* ``data.py``: an exported feedback dataset, or the store's feedback exported for the run.
* ``lora.py``: LoRA training with peft (``--lora``, ``--merge``); the registry serves the adapters
  without peft (:mod:`mmdemo.lora`).
* ``train.py``: the plain torch loop (AdamW, gradient clipping, validation each epoch, best kept).
* ``jobs.py``: :class:`FinetuneJob` (status, progress, cancel), the atomic checkpoint and serving, and
  :func:`~mmdemo.finetune.jobs.run_stored_job`, the body of a job's process.
* ``processes.py``: :class:`~mmdemo.finetune.processes.JobRunner`, the app's queue of job processes.

The training code (``jobs``, ``train``) is imported on first use of its names, so that the web server,
which only queues and follows jobs, never imports it.
"""

from typing import Any


from .adapters import FinetuneAdapter, adapter_for, finetune_adapters
from .config import FinetuneConfig, check_model_name
from .errors import (
    FinetuneCancelled,
    FinetuneError,
    InvalidDatasetError,
    InvalidModelNameError,
    UnsupportedBaseError,
)

_TRAINING_NAMES = {"METRICS_FILE": "lineage", "RUN_CONFIG_FILE": "lineage", "FinetuneJob": "jobs", "FinetuneResult": "jobs",
                   "JobStatus": "jobs", "run_finetune": "jobs", "Progress": "train"}


def __getattr__(name: str) -> Any:
    """The training code's names, imported when first used (see the module's docstring)."""
    if name not in _TRAINING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_TRAINING_NAMES[name]}"), name)


__all__ = [
    "FinetuneAdapter",
    "FinetuneCancelled",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneJob",
    "FinetuneResult",
    "InvalidDatasetError",
    "InvalidModelNameError",
    "JobStatus",
    "METRICS_FILE",
    "Progress",
    "RUN_CONFIG_FILE",
    "UnsupportedBaseError",
    "adapter_for",
    "check_model_name",
    "finetune_adapters",
    "run_finetune",
]
