"""Helpers the fine-tuning tests share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmdemo.config import Settings
from mmdemo.finetune import FinetuneConfig, FinetuneJob

JOB_OPTIONS = ("store", "registry", "on_progress")  # FinetuneJob's own keyword arguments


def tiny_models_folder(tmp_path_factory: Any, names: list[str]) -> Path:
    """A module's own tiny checkpoints (only ``names``), built once in a temporary folder."""
    from mmdemo.tasks import build_tiny_models

    folder = tmp_path_factory.mktemp("tiny") / "tiny-models"
    build_tiny_models(folder, names=names)
    return folder


def settings_on(data_dir: Path, tiny_models: Path) -> Settings:
    """Tiny-profile settings on CPU for a new data dir that uses the checkpoints of ``tiny_models``."""
    data_dir.mkdir()
    (data_dir / "tiny-models").symlink_to(tiny_models, target_is_directory=True)
    return Settings(profile="tiny", data_dir=data_dir, device="cpu")


def make_job(settings: Settings, task: str, base: str, name: str, fast: dict[str, Any], **options: Any) -> FinetuneJob:
    """A job fine-tuning ``base`` for ``task`` into ``name`` with the test's ``fast`` settings, ``options`` winning
    (``store``, ``registry`` and ``on_progress`` go to the job, the rest to its config)."""
    job_options = {key: options.pop(key) for key in JOB_OPTIONS if key in options}
    return FinetuneJob(FinetuneConfig(task, base=base, name=name, **{**fast, **options}), settings, **job_options)


def listing(settings: Settings) -> list[str]:
    """What is in the models folder, besides the jobs' lock files."""
    found = os.listdir(settings.models_dir) if settings.models_dir.exists() else []
    return sorted(name for name in found if name != ".locks")


ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def counting_registry(settings: Settings) -> tuple[Any, list[str]]:
    """A registry of ``settings`` and the ids its loader loaded, in order (a model loaded twice shows twice)."""
    from mmdemo.registry import ModelRegistry
    from mmdemo.tasks import build_tiny_models, load_model, open_catalog

    loads: list[str] = []

    def loader(spec: Any, location: str, placement: Any) -> Any:
        loads.append(spec.id)
        return load_model(spec, location, placement)

    return ModelRegistry(open_catalog(settings), settings, loader=loader, tiny_builder=build_tiny_models), loads


def peft_twin(task: str, base_spec: Any, location: str, folder: Any) -> Any:
    """The base model with peft's own loading of the adapter in ``folder`` (what the registry must match)."""
    from peft import PeftModel

    from mmdemo.finetune import adapter_for
    from mmdemo.placement import Placement

    model, _ = adapter_for(task).load(base_spec, location, Placement("cpu", "float32"))
    return PeftModel.from_pretrained(model, str(folder)).eval()


def served_output(registry: Any, model_id: str, forward: Any) -> Any:
    """``forward(torch model)`` run inside a registry call of ``model_id`` (its adapter active), no grad."""
    import torch

    def body(bundle: Any) -> Any:
        with torch.inference_mode():
            return forward(bundle.model)

    return registry.call(model_id, body)
