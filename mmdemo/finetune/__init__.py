"""Fine-tuning: turn the feedback people gave into new checkpoints that the registry serves.

>>> from mmdemo.finetune import FinetuneConfig, FinetuneJob
>>> config = FinetuneConfig("image-to-text", base="blip-caption-base", name="blip-products", epochs=3)
>>> result = FinetuneJob(config, settings).run()      # <data_dir>/models/blip-products/, in the catalog

* ``config.py``: :class:`FinetuneConfig`, the typed run configuration (saved as ``run_config.json``).
* ``adapters.py``: the per-task interface (:class:`FinetuneAdapter`); ``caption.py`` trains BLIP
  captioners. Another task is one more adapter module.
* ``data.py``: an exported feedback dataset, or the store's feedback exported for the run.
* ``train.py``: the plain torch loop (AdamW, gradient clipping, validation each epoch, best kept).
* ``jobs.py``: :class:`FinetuneJob` (status, progress, cancel), the atomic checkpoint and serving.
"""

from .adapters import FinetuneAdapter, adapter_for, finetune_adapters
from .config import FinetuneConfig, check_model_name
from .errors import (
    FinetuneCancelled,
    FinetuneError,
    InvalidDatasetError,
    InvalidModelNameError,
    UnsupportedBaseError,
)
from .jobs import METRICS_FILE, RUN_CONFIG_FILE, FinetuneJob, FinetuneResult, JobStatus, run_finetune
from .train import Progress

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
