"""The tasks behind one interface, and the functions every caller (UI, CLI, API) uses.

Each task is described by a :class:`TaskSpec` registered in its own module (see :mod:`.spec`);
this package finds them, builds the catalog and the registry from them, and runs requests.

>>> from mmdemo.tasks import open_registry, run
>>> registry = open_registry(settings)
>>> run(registry, "image-to-text", image="cat.jpg")["text"]
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..catalog import Catalog, ModelSpec, load_catalog
from ..config import Settings
from ..errors import InvalidInputError
from ..media import MediaLimits
from ..placement import Placement
from ..registry import ModelRegistry
from ..tiny import TinyBuilder
from ..tiny import build_tiny_models as _build_tiny
from .base import Task
from .spec import TaskSpec, register_task, resolve, task_ids, task_spec, task_specs


def get_task(task: str) -> Task:
    """The runner of task id or alias ``task`` (``UnknownTaskError``, an ``InvalidInputError``, if none)."""
    return task_spec(task).runner


def tiny_builders() -> dict[str, TinyBuilder]:
    """Every task's tiny checkpoint builders, by tiny model name."""
    builders: dict[str, TinyBuilder] = {}
    for spec in task_specs():
        builders.update(spec.tiny_builders)
    return builders


def build_tiny_models(target_dir: Path, force: bool = False, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Build the tiny checkpoints of every task (see :func:`mmdemo.tiny.build_tiny_models`)."""
    return _build_tiny(target_dir, tiny_builders(), force=force, names=names)


def task_kinds() -> dict[str, dict[str, str]]:
    """Task id -> model kind -> backend, for the catalog."""
    return {spec.id: dict(spec.kinds) for spec in task_specs()}


def builtin_models() -> dict[str, list[ModelSpec]]:
    """Profile -> the built-in catalog entries of every task."""
    return {"default": [m for spec in task_specs() for m in spec.models],
            "tiny": [m for spec in task_specs() for m in spec.tiny_models]}


def task_catalog(profile: str = "default", catalog_file: Path | None = None,
                 models_dir: Path | None = None) -> Catalog:
    """The tasks' built-in models of ``profile``, then fine-tuned model folders, then a user catalog file
    (see :func:`mmdemo.catalog.load_catalog`)."""
    return load_catalog(builtin_models(), task_kinds(), profile, catalog_file, models_dir)


def open_catalog(settings: Settings) -> Catalog:
    """The catalog of ``settings``: its profile's built-in models, fine-tuned model folders, its catalog file."""
    return task_catalog(settings.profile, settings.catalog, settings.models_dir)


def open_registry(settings: Settings, catalog: Catalog | None = None, **options: Any) -> ModelRegistry:
    """The model registry of ``settings`` (its catalog unless ``catalog`` is given), loading models with the
    tasks' loaders; ``options`` go to :class:`~mmdemo.registry.ModelRegistry` (``hub``, ``busy_wait_seconds``)."""
    return ModelRegistry(catalog or open_catalog(settings), settings, loader=load_model,
                         tiny_builder=build_tiny_models, **options)


def load_model(spec: ModelSpec, location: str, placement: Placement) -> Any:
    """The registry's loader: the task of ``spec`` knows how to load its kinds."""
    quiet_libraries()
    return get_task(spec.task).load(spec, location, placement)


@functools.cache
def quiet_libraries() -> None:
    """No progress bars or advisory warnings from the model libraries in a server's logs."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def limits_for(registry: ModelRegistry) -> MediaLimits:
    s = registry.settings
    return MediaLimits(max_image_pixels=s.max_image_pixels, max_upload_bytes=s.max_upload_bytes,
                       max_audio_seconds=s.max_audio_seconds)


def prepare(registry: ModelRegistry, task: str, model_id: str | None, inputs: dict[str, Any]) -> tuple[ModelSpec, Any]:
    """Resolve the model (the task's default when None) and validate the inputs, before any loading.

    Settings left as None take the model's catalog defaults, then the task's.
    """
    described = task_spec(task)
    runner, task = described.runner, described.id
    spec = registry.catalog.get(model_id, task) if model_id else registry.catalog.default_for(task)
    merged = {**spec.defaults, **{k: v for k, v in inputs.items() if v is not None}}
    return spec, runner.prepare(merged, limits_for(registry), spec)


@dataclass
class Prediction:
    """One answered request: the task, the catalog model that answered, the validated request (what the
    task checked and the model ran on), the raw media the person sent (the store keeps it), the result
    (with ``model``, ``seconds`` and, once recorded, ``output_id``)."""

    task: str
    model: ModelSpec
    request: Any
    media: Any
    result: dict[str, Any]

    @property
    def output_id(self) -> str | None:
        return self.result.get("output_id")


Record = Callable[[Prediction], "str | None"]  # records a prediction for feedback; returns its output id


def predict(registry: ModelRegistry, task: str, model_id: str | None, inputs: dict[str, Any], *,
            record: Record | None = None) -> Prediction:
    """The one way a request is answered (the UI, the API, ``mmdemo predict`` and annotation imports):
    resolve the model, validate and decode the inputs once, run the model, and hand the prediction to
    ``record`` (the feedback store's or the app's recorder), whose output id goes into the result.

    Raises ``InvalidInputError`` subclasses for bad input (before any model is touched) and model errors
    from ``mmdemo.errors``.
    """
    return predict_batch(registry, task, model_id, [inputs], record=record)[0]


def predict_batch(registry: ModelRegistry, task: str, model_id: str | None, batch: list[dict[str, Any]], *,
                  record: Record | None = None) -> list[Prediction]:
    """:func:`predict` for several requests to one model, in one model call where the task batches."""
    if not model_id:  # the task's default, chosen once for the batch (a promotion may switch it meanwhile)
        model_id = registry.catalog.default_for(task_spec(task).id).id
    prepared = [prepare(registry, task, model_id, inputs) for inputs in batch]
    spec = prepared[0][0]
    requests = [request for _, request in prepared]
    runner = get_task(spec.task)
    body = _timed(runner.predict_batch, requests) if len(requests) > 1 else _timed(_one(runner), requests)
    results, placement, seconds = registry.call(spec.id, body, spec.task)
    media_field = task_spec(spec.task).schema.media_input
    predictions = [Prediction(spec.task, spec, request, inputs.get(media_field) if media_field else None,
                              _with_provenance(result, spec, placement, seconds))
                   for inputs, request, result in zip(batch, requests, results)]
    if record is not None:
        for prediction in predictions:
            prediction.result["output_id"] = record(prediction)
    return predictions


def prepare_comparison(registry: ModelRegistry, task: str, model_a: str | None, model_b: str | None,
                       inputs: dict[str, Any]) -> dict[str, Any]:
    """Check a comparison of two models of ``task`` on one request before either runs, and return the inputs
    both will run with: a setting drawn at random when left empty (text-to-image's seed) is drawn once, so both
    models get the same seed and settings. ``InvalidInputError`` (``field`` ``model_b``) for the same model twice."""
    for name, model_id in (("model_a", model_a), ("model_b", model_b)):
        if not model_id:
            raise InvalidInputError("Choose two models to compare.", field=name)
    spec_a, request_a = prepare(registry, task, model_a, inputs)
    spec_b = registry.catalog.get(model_b, spec_a.task)
    if spec_b.id == spec_a.id:
        raise InvalidInputError(f"Choose two different models to compare (both are {spec_a.id}).", field="model_b")
    drawn = {name: getattr(request_a, name) for name, value in inputs.items()
             if value is None and getattr(request_a, name, None) is not None}
    shared = {**inputs, **drawn}
    prepare(registry, task, model_b, shared)
    return shared


def compare(registry: ModelRegistry, task: str, model_a: str | None, model_b: str | None, inputs: dict[str, Any], *,
            record: Record | None = None) -> tuple[Prediction, Prediction]:
    """Run one request on two models with the same settings and seed (see :func:`prepare_comparison`), each
    prediction recorded by ``record``; the predictions in the order the models were named."""
    shared = prepare_comparison(registry, task, model_a, model_b, inputs)
    return (predict(registry, task, model_a, shared, record=record),
            predict(registry, task, model_b, shared, record=record))


def run(registry: ModelRegistry, task: str, model_id: str | None = None, **inputs: Any) -> dict[str, Any]:
    """The result of :func:`predict`, not recorded: the task's result plus ``model`` (id, revision, device,
    dtype) and ``seconds``."""
    return predict(registry, task, model_id, inputs).result


def run_batch(registry: ModelRegistry, task: str, model_id: str | None,
              batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of :func:`predict_batch`, not recorded."""
    return [prediction.result for prediction in predict_batch(registry, task, model_id, batch)]


def _one(runner: Task) -> Callable[[Any, list[Any]], list[dict[str, Any]]]:
    return lambda model, requests: [runner.predict(model, requests[0])]


def _timed(predict: Any, request: Any) -> Any:
    """A registry call body that also reports the model's placement and the inference time."""

    def body(model: Any) -> tuple[Any, Placement, float]:
        started = time.perf_counter()
        result = predict(model, request)
        return result, model.placement, time.perf_counter() - started

    return body


def _with_provenance(result: dict[str, Any], spec: ModelSpec, placement: Placement, seconds: float) -> dict[str, Any]:
    result["model"] = {"id": spec.id, "source": spec.source, "revision": spec.revision, "backend": spec.backend,
                       "device": placement.device, "dtype": placement.dtype}
    result["seconds"] = round(seconds, 4)
    return result


__all__ = ["Prediction", "Record", "Task", "TaskSpec", "build_tiny_models", "compare", "get_task", "load_model",
           "open_catalog", "open_registry", "predict", "predict_batch", "prepare", "prepare_comparison", "register_task",
           "resolve", "run", "run_batch", "task_catalog", "task_ids", "task_spec", "task_specs", "tiny_builders"]
