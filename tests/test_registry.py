"""The registry on tiny real checkpoints: single load under concurrency, budget and eviction,
never evicting a running model, OOM retry, hot swap, failure isolation and status."""

from __future__ import annotations

import gc
import shutil
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mmdemo.catalog import ModelSpec
from mmdemo.errors import (
    MemoryBudgetError,
    ModelLoadError,
    ModelOutOfMemoryError,
    ModelRuntimeError,
    UnknownModelError,
)
from mmdemo.registry import ModelRegistry, default_dtype, measure_bytes
from mmdemo.tasks import load_model, run

CAPTION = "tiny-blip-caption"
CLIP = "tiny-clip"
VILT = "tiny-vilt-vqa"


class CountingLoader:
    """The real loader, counted and slowed down a little so that concurrent first calls overlap."""

    def __init__(self, delay: float = 0.2) -> None:
        self.loads: list[str] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, spec, location, placement):
        with self._lock:
            self.loads.append(spec.id)
        time.sleep(self.delay)
        return load_model(spec, location, placement)


def module_of(registry: ModelRegistry, model_id: str) -> torch.nn.Module:
    return registry.call(model_id, lambda bundle: bundle.model)


def test_nothing_is_loaded_until_first_use(fresh_registry):
    registry = fresh_registry()
    assert registry.status()["loaded"] == []
    assert registry.status()["device"] == "not chosen yet"


def test_ten_concurrent_first_requests_load_once(fresh_registry):
    registry = fresh_registry()
    loader = CountingLoader()
    registry._loader = loader
    barrier = threading.Barrier(10)

    def first_call(_):
        barrier.wait()
        return registry.call(CAPTION, lambda bundle: id(bundle.model))

    with ThreadPoolExecutor(10) as pool:
        model_ids = list(pool.map(first_call, range(10)))
    assert loader.loads == [CAPTION]
    assert len(set(model_ids)) == 1  # every caller saw the same copy
    (entry,) = registry.status()["loaded"]
    assert entry["calls"] == 10 and entry["in_use"] == 0


def test_device_and_dtype_for_cpu(fresh_registry):
    registry = fresh_registry(device="auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert registry.device == expected
    assert default_dtype("cpu") == "float32"
    placement = registry.placement_for(registry.catalog.get(CAPTION))
    assert placement.dtype == default_dtype(registry.device)
    forced = fresh_registry(dtype="bfloat16")
    module = module_of(forced, CLIP)
    assert next(module.parameters()).dtype == torch.bfloat16


def test_unknown_model_is_refused_without_loading(fresh_registry):
    registry = fresh_registry()
    with pytest.raises(UnknownModelError, match="Unknown model 'org/evil-remote-code'"):
        registry.call("org/evil-remote-code", lambda bundle: None)
    assert registry.status()["loaded"] == []


def test_budget_evicts_least_recently_used_and_frees_memory(fresh_registry):
    probe = fresh_registry()
    sizes = {model_id: measure_bytes(probe.call(model_id, lambda b: b)) for model_id in (CAPTION, CLIP, VILT)}
    probe.unload_all()
    # Room for CAPTION and CLIP, not for all three: loading VILT must evict the LRU one (CAPTION).
    budget = sizes[CAPTION] + sizes[CLIP] + sizes[VILT] - 1
    registry = fresh_registry(memory_budget=str(budget))
    for model_id in (CAPTION, CLIP, VILT):  # make estimates exact so the test is about eviction
        spec = registry.catalog.get(model_id)
        registry.catalog.register(_with_params(spec, sizes[model_id]), override=True)

    caption_ref = weakref.ref(module_of(registry, CAPTION))
    module_of(registry, CLIP)
    module_of(registry, CLIP)  # CLIP is now the most recently used
    module_of(registry, VILT)

    loaded = {entry["id"] for entry in registry.status()["loaded"]}
    assert loaded == {CLIP, VILT}
    assert registry.used_bytes() <= budget
    gc.collect()
    assert caption_ref() is None, "the evicted model's weights are still referenced"


def test_model_larger_than_budget_is_a_clear_error(fresh_registry):
    registry = fresh_registry(memory_budget="1KB")
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        registry.call(CAPTION, lambda bundle: None)
    # and the registry still works for something that fits once the budget allows it
    assert registry.status()["loaded"] == []


def test_running_model_is_never_evicted(fresh_registry):
    probe = fresh_registry()
    sizes = {model_id: measure_bytes(probe.call(model_id, lambda b: b)) for model_id in (CAPTION, CLIP)}
    probe.unload_all()
    registry = fresh_registry(memory_budget=str(max(sizes.values()) + 1))
    for model_id in (CAPTION, CLIP):
        spec = registry.catalog.get(model_id)
        registry.catalog.register(_with_params(spec, sizes[model_id]), override=True)

    started, finish = threading.Event(), threading.Event()

    def long_call(bundle):
        started.set()
        finish.wait(10)
        return bundle.model

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(registry.call, CAPTION, long_call)
        started.wait(5)
        waiting = pool.submit(registry.call, CLIP, lambda bundle: "clip ran")
        time.sleep(0.5)
        assert registry.is_loaded(CAPTION) and not waiting.done()  # CLIP waits for room
        finish.set()
        assert running.result(10) is not None
        assert waiting.result(10) == "clip ran"
    assert [e["id"] for e in registry.status()["loaded"]] == [CLIP]


def test_busy_budget_times_out_with_a_clear_error(fresh_registry):
    probe = fresh_registry()
    size = measure_bytes(probe.call(CAPTION, lambda b: b))
    registry = fresh_registry(memory_budget=str(size + 1))
    registry._busy_wait_seconds = 0.3
    spec = registry.catalog.get(CAPTION)
    registry.catalog.register(_with_params(spec, size), override=True)
    clip = registry.catalog.get(CLIP)
    registry.catalog.register(_with_params(clip, size), override=True)

    started, finish = threading.Event(), threading.Event()
    holder = threading.Thread(target=registry.call, args=(CAPTION, lambda b: (started.set(), finish.wait(10))))
    holder.start()
    started.wait(5)
    try:
        with pytest.raises(MemoryBudgetError, match="busy"):
            registry.call(CLIP, lambda bundle: None)
    finally:
        finish.set()
        holder.join()


def test_out_of_memory_in_a_call_evicts_others_and_retries_once(fresh_registry):
    registry = fresh_registry()
    module_of(registry, CLIP)
    attempts = []

    def flaky(bundle):
        attempts.append(1)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "ok"

    assert registry.call(CAPTION, flaky) == "ok"
    assert len(attempts) == 2
    assert not registry.is_loaded(CLIP), "the other model should have been evicted to make room"

    def always_oom(bundle):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(ModelOutOfMemoryError, match="ran out of memory"):
        registry.call(CAPTION, always_oom)
    assert registry.call(CLIP, lambda bundle: "still works") == "still works"


def test_a_model_fault_is_contained(fresh_registry):
    registry = fresh_registry()

    def broken(bundle):
        raise RuntimeError("shape mismatch in layer 3")

    with pytest.raises(ModelRuntimeError, match="shape mismatch"):
        registry.call(CAPTION, broken)
    assert registry.status()["loaded"][0]["in_use"] == 0  # the lease was returned


def _corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return target


def test_failed_load_is_isolated_to_that_model(fresh_registry, tmp_path):
    registry = fresh_registry()
    good = Path(registry.resolve_location(registry.catalog.get(CAPTION)))
    broken = _corrupt_copy(good, tmp_path / "broken-blip")
    registry.catalog.register(ModelSpec("broken-blip", "image-to-text", "blip", f"local-dir:{broken}"))
    registry.catalog.register(ModelSpec("missing-blip", "image-to-text", "blip", f"local-dir:{tmp_path / 'nope'}"))

    with pytest.raises(ModelLoadError, match="'broken-blip' could not be loaded"):
        registry.call("broken-blip", lambda bundle: None)
    with pytest.raises(ModelLoadError, match="does not exist"):
        registry.call("missing-blip", lambda bundle: None)
    assert "broken-blip" in registry.status()["errors"]
    assert registry.call(CAPTION, lambda bundle: "fine") == "fine"
    assert registry.call(CLIP, lambda bundle: "fine") == "fine"


def test_hot_swap_keeps_old_on_failure_and_switches_on_success(fresh_registry, tmp_path):
    registry = fresh_registry()
    old_module = module_of(registry, CAPTION)
    old_source = registry.catalog.get(CAPTION).source
    good = Path(registry.resolve_location(registry.catalog.get(CAPTION)))

    with pytest.raises(ModelLoadError):
        registry.replace(CAPTION, f"local-dir:{_corrupt_copy(good, tmp_path / 'bad')}")
    assert module_of(registry, CAPTION) is old_module
    assert registry.catalog.get(CAPTION).source == old_source

    # A "fine-tuned" checkpoint: the same architecture with changed weights.
    tuned = tmp_path / "tuned"
    model = load_model(registry.catalog.get(CAPTION), str(good), registry.placement_for(registry.catalog.get(CAPTION)))
    with torch.no_grad():
        for parameter in model.model.parameters():
            parameter.add_(0.01)
    model.model.save_pretrained(tuned)
    model.processor.save_pretrained(tuned)

    # A call in flight on the old model finishes on the old model while the swap happens.
    started, finish = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(registry.call, CAPTION, lambda b: (started.set(), finish.wait(10), b.model)[2])
        started.wait(5)
        registry.replace(CAPTION, f"local-dir:{tuned}")
        finish.set()
        assert in_flight.result(10) is old_module
    new_module = module_of(registry, CAPTION)
    assert new_module is not old_module
    assert registry.catalog.get(CAPTION).source == f"local-dir:{tuned}"
    assert registry.status()["loaded"][0]["source"] == f"local-dir:{tuned}"


def test_status_unload_and_preload(fresh_registry):
    registry = fresh_registry()
    registry.preload([CAPTION, CLIP])
    status = registry.status()
    assert [m["id"] for m in status["loaded"]] == [CAPTION, CLIP]
    for model in status["loaded"]:
        assert model["device"] == "cpu" and model["dtype"] == "float32"
        assert model["memory_bytes"] > 0 and model["load_seconds"] > 0 and model["calls"] == 1
    assert registry.unload(CLIP) is True
    assert registry.unload(CLIP) is False
    assert [m["id"] for m in registry.status()["loaded"]] == [CAPTION]


def test_run_reports_model_device_and_time(shared_registry, tmp_path):
    from PIL import Image

    image = Image.new("RGB", (40, 30), "red")
    result = run(shared_registry, "image-to-text", CAPTION, image=image)
    assert result["model"]["id"] == CAPTION and result["model"]["device"] == "cpu"
    assert result["seconds"] > 0


@pytest.mark.gpu
def test_eviction_returns_cuda_memory(fresh_registry):
    registry = fresh_registry(device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    module_of(registry, CAPTION)
    assert torch.cuda.memory_allocated() > before
    registry.unload(CAPTION)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def _with_params(spec: ModelSpec, size_bytes: int) -> ModelSpec:
    """The spec with an estimate equal to ``size_bytes`` at float32 (estimate = params*4*1.2)."""
    import dataclasses

    return dataclasses.replace(spec, params_m=size_bytes / (4 * 1.2) / 1e6)
