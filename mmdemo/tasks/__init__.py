"""The five tasks behind one interface, and the functions every caller (UI, CLI, API) uses.

>>> from mmdemo.tasks import run
>>> run(registry, "image-to-text", image="cat.jpg")["text"]
"""

from __future__ import annotations

import functools
import time
from typing import Any

from ..catalog import ModelSpec
from ..media import MediaLimits
from ..placement import Placement
from ..registry import ModelRegistry
from .base import Task
from .caption import CaptionTask
from .speech import SpeechTask
from .text_to_image import TextToImageTask
from .vqa import VqaTask
from .zero_shot import ZeroShotTask
from ..tiny import TinyBuilder
from ..tiny import build_tiny_models as _build_tiny
from ..tiny.blip import build_blip_caption, build_blip_vqa
from ..tiny.clip import build_clip, build_siglip
from ..tiny.stable_diffusion import build_stable_diffusion
from ..tiny.vilt import build_vilt_vqa
from ..tiny.whisper import build_whisper, build_whisper_ct2_beside_whisper

TASK_RUNNERS: dict[str, Task] = {
    runner.task: runner
    for runner in (CaptionTask(), VqaTask(), TextToImageTask(), ZeroShotTask(), SpeechTask())
}


TINY_BUILDERS: dict[str, TinyBuilder] = {
    "blip-caption": TinyBuilder(build_blip_caption),
    "blip-vqa": TinyBuilder(build_blip_vqa),
    "vilt-vqa": TinyBuilder(build_vilt_vqa),
    "clip": TinyBuilder(build_clip),
    "siglip": TinyBuilder(build_siglip),
    "whisper": TinyBuilder(build_whisper),
    "whisper-ct2": TinyBuilder(build_whisper_ct2_beside_whisper, needs=("whisper",)),
    "stable-diffusion": TinyBuilder(build_stable_diffusion),
}


def build_tiny_models(target_dir, force: bool = False, names=None):
    """Build the tiny checkpoints of every task (see :func:`mmdemo.tiny.build_tiny_models`)."""
    return _build_tiny(target_dir, TINY_BUILDERS, force=force, names=names)


def get_task(task: str) -> Task:
    try:
        return TASK_RUNNERS[task]
    except KeyError:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"Unknown task '{task}'. Tasks: {', '.join(TASK_RUNNERS)}.") from None


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
    runner = get_task(task)
    spec = registry.catalog.get(model_id, task) if model_id else registry.catalog.default_for(task)
    merged = {**spec.defaults, **{k: v for k, v in inputs.items() if v is not None}}
    return spec, runner.prepare(merged, limits_for(registry), spec)


def run(registry: ModelRegistry, task: str, model_id: str | None = None, **inputs: Any) -> dict[str, Any]:
    """Run one ``task`` request on ``model_id`` (default: the task's first catalog model).

    Returns the task's result plus ``model`` (id, revision, device, dtype) and ``seconds``.
    Raises ``InvalidInputError`` subclasses for bad input and model errors from ``mmdemo.errors``.
    """
    spec, request = prepare(registry, task, model_id, inputs)
    result, placement, seconds = registry.call(spec.id, _timed(TASK_RUNNERS[task].predict, request), task)
    return _with_provenance(result, spec, placement, seconds)


def run_batch(registry: ModelRegistry, task: str, model_id: str | None, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run several requests for one model in one call (batched where the task supports it)."""
    prepared = [prepare(registry, task, model_id, inputs) for inputs in batch]
    spec = prepared[0][0]
    requests = [request for _, request in prepared]
    results, placement, seconds = registry.call(spec.id, _timed(TASK_RUNNERS[task].predict_batch, requests), task)
    return [_with_provenance(result, spec, placement, seconds) for result in results]


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


__all__ = ["TASK_RUNNERS", "Task", "get_task", "load_model", "prepare", "run", "run_batch"]
