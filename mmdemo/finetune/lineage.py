"""Where a fine-tuned model comes from, read from the files its job published beside the checkpoint
(``metrics.json``, ``run_config.json``): its base, the data's fingerprint, the records it trained on and the
before/after of its evaluation. Imports no training code (the web server reads it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..catalog import ModelSpec
from .evaluate import before_after

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"   # not config.json: save_pretrained writes the model's config there
METRICS_FILE = "metrics.json"


def training_lineage(spec: ModelSpec) -> dict[str, Any] | None:
    """A fine-tuned model's lineage: ``base``, ``data_fingerprint``, ``records`` (train / validation rows),
    ``data_source``, ``trained_at``, ``before_after`` (:func:`~.evaluate.before_after`: None when nothing
    was scored) and ``run_config``; None for a model that no fine-tuning job made (or whose record is
    unreadable, logged)."""
    if spec.source_scheme != "local-dir":
        return None
    folder = Path(spec.source_location)
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
        config_file = folder / RUN_CONFIG_FILE
        run_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return {"base": metrics["base"]["id"], "data_fingerprint": metrics["data"]["fingerprint"],
                "records": dict(metrics["data"]["rows"]), "data_source": metrics["data"].get("source"),
                "trained_at": metrics.get("finished_at"), "before_after": before_after(metrics, spec.id, spec.task),
                "run_config": run_config}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the training record of %s in %s is unreadable: %s", spec.id, folder, exc)
        return None
