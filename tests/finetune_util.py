"""Helpers the fine-tuning tests share."""

from __future__ import annotations

import os
from typing import Any

from mmdemo.config import Settings
from mmdemo.finetune import FinetuneConfig, FinetuneJob

JOB_OPTIONS = ("store", "registry", "on_progress")  # FinetuneJob's own keyword arguments


def make_job(settings: Settings, task: str, base: str, name: str, fast: dict[str, Any], **options: Any) -> FinetuneJob:
    """A job fine-tuning ``base`` for ``task`` into ``name`` with the test's ``fast`` settings, ``options`` winning
    (``store``, ``registry`` and ``on_progress`` go to the job, the rest to its config)."""
    job_options = {key: options.pop(key) for key in JOB_OPTIONS if key in options}
    return FinetuneJob(FinetuneConfig(task, base=base, name=name, **{**fast, **options}), settings, **job_options)


def listing(settings: Settings) -> list[str]:
    """What is in the models folder, besides the jobs' lock files."""
    found = os.listdir(settings.models_dir) if settings.models_dir.exists() else []
    return sorted(name for name in found if name != ".locks")
