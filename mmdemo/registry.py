"""The one owner of loaded models.

``ModelRegistry`` loads catalog models lazily, keeps exactly one copy of each for every user, tab and
thread, places it on the best device with a fitting dtype, and keeps the total under a memory budget
by evicting the least recently used idle models. A model is never evicted while a call is running on
it. Out-of-memory errors evict the other models and retry once. ``replace`` hot-swaps a model to a
new checkpoint while the old one keeps serving.

Task code never holds models itself: it calls ``registry.call(model_id, fn)``, where ``fn`` receives
the loaded model bundle for the duration of the call.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from .catalog import Catalog, ModelSpec
from .config import Settings, parse_memory_budget
from .errors import (
    MemoryBudgetError,
    MMDemoError,
    ModelLoadError,
    ModelOutOfMemoryError,
    ModelRuntimeError,
)
from .hub import HubProbe, cached_snapshot
from .lora import AdapterFormatError, AdapterWeights, active, read_adapter, remove_from, serve_on, torch_modules
from .placement import Placement, default_dtype, detect_device

log = logging.getLogger(__name__)
T = TypeVar("T")
Loader = Callable[[ModelSpec, str, "Placement"], Any]
TinyBuild = Callable[..., "dict[str, Path]"]  # (target_dir, names=[...]) -> name -> folder


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    placement: Placement
    memory_bytes: int
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0
    in_use: int = 0
    base: "LoadedModel | None" = None        # a LoRA adapter served on its base's loaded copy
    adapter: AdapterWeights | None = None     # ... and its weights, hooked on that copy


# --- hardware ---------------------------------------------------------------------------------------


def device_total_bytes(device: str) -> int:
    """Total memory of the device the budget applies to (system RAM for CPU and MPS)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_bytes(bundle: Any) -> int:
    """Bytes of parameters and buffers held by the torch modules inside a loaded bundle."""
    if isinstance(getattr(bundle, "memory_bytes", None), int):  # backends without torch tensors
        return bundle.memory_bytes
    seen: set[int] = set()
    total = 0
    for module in torch_modules(bundle):
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    elif device == "mps":
        import torch

        torch.mps.empty_cache()


# --- the registry ------------------------------------------------------------------------------------


class ModelRegistry:
    """Lazy, shared, budgeted model loading for every task. Thread-safe."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings | None = None,
        *,
        loader: Loader,
        tiny_builder: TinyBuild | None = None,
        busy_wait_seconds: float = 120.0,
        hub: HubProbe | None = None,
    ) -> None:
        """``loader(spec, location, placement)`` loads one model (the tasks' loaders: build a registry with
        :func:`mmdemo.tasks.open_registry`); ``tiny_builder(folder, names=[name])`` builds ``tiny:`` sources."""
        self.catalog = catalog
        self.settings = settings or Settings()
        self._loader = loader
        self._tiny_builder = tiny_builder
        self.hub = hub or HubProbe()
        self._busy_wait_seconds = busy_wait_seconds
        self._lock = threading.Condition(threading.RLock())
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, Future] = {}
        self._reserved: dict[str, int] = {}  # bytes promised to loads in progress
        self._errors: dict[str, str] = {}  # last load error per model, for status()
        self._device: str | None = None
        self._budget: int | None = None

    # -- placement and budget --

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = detect_device(self.settings.device)
        return self._device

    @property
    def budget_bytes(self) -> int:
        if self._budget is None:
            self._budget = parse_memory_budget(self.settings.memory_budget, device_total_bytes(self.device))
        return self._budget

    def placement_for(self, spec: ModelSpec) -> Placement:
        dtype = spec.dtype if spec.dtype != "auto" else self.settings.dtype
        if dtype == "auto":
            dtype = default_dtype(self.device)
        return Placement(self.device, dtype)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.memory_bytes for e in self._loaded.values()) + sum(self._reserved.values())

    # -- the hot path --

    def call(self, model_id: str, fn: Callable[[Any], T], task: str | None = None) -> T:
        """Run ``fn(model_bundle)`` on the loaded model, loading it first if needed.

        An out-of-memory error evicts the other models and retries once. Errors that are not
        mmdemo's own become ``ModelRuntimeError`` so that one model's fault stays in its call.
        """
        for attempt in (1, 2):
            entry = self._acquire(model_id, task)
            try:
                with active(entry.spec.id if entry.base is not None else None):  # this call's adapter, if any
                    return fn(entry.model)
            except MMDemoError:
                raise
            except Exception as exc:  # noqa: BLE001 - a model fault must not escape as a crash
                if is_out_of_memory(exc):
                    if attempt == 2:
                        raise ModelOutOfMemoryError(
                            f"Model '{model_id}' ran out of memory on {entry.placement.device} even after "
                            "freeing the other models. Try smaller settings (size, batch, length)."
                        ) from None
                else:
                    log.exception("model %s failed during a call", model_id)
                    raise ModelRuntimeError(f"Model '{model_id}' failed: {type(exc).__name__}: {exc}") from exc
            finally:
                self._release(entry)
            log.warning("out of memory in %s; evicting other models and retrying once", model_id)
            self._evict_idle(keep=model_id, needed=None)
        raise AssertionError("unreachable")

    def _acquire(self, model_id: str, task: str | None) -> LoadedModel:
        spec = self.catalog.get(model_id, task)
        while True:
            with self._lock:
                entry = self._loaded.get(model_id)
                if entry is not None:
                    self._hold(entry)
                    return entry
                future = self._loading.get(model_id)
                is_loader = future is None
                if is_loader:
                    future = self._loading[model_id] = Future()
            if not is_loader:
                future.result()  # re-raises the loader's error for every waiter
                continue
            try:
                entry = self._load(spec)
            except BaseException as exc:
                with self._lock:
                    self._loading.pop(model_id, None)
                    self._errors[model_id] = str(exc)
                future.set_exception(exc)
                raise
            with self._lock:
                entry.in_use = 1  # an adapter's load already holds its base for this first call
                self._loaded[model_id] = entry
                self._loading.pop(model_id, None)
                self._errors.pop(model_id, None)
            future.set_result(None)
            return entry

    def _hold(self, entry: LoadedModel) -> None:
        """One more call on ``entry`` (and on the base an adapter runs on, so that it is not evicted)."""
        with self._lock:
            for held in (entry, entry.base):
                if held is not None:
                    held.in_use += 1
                    held.last_used = time.monotonic()

    def _release(self, entry: LoadedModel) -> None:
        with self._lock:
            entry.calls += 1
            for held in (entry, entry.base):
                if held is not None:
                    held.in_use -= 1
                    held.last_used = time.monotonic()
            if entry.in_use == 0 and self._loaded.get(entry.spec.id) is not entry:
                self._unhook(entry)  # dropped during its call: its hooks go now
            self._lock.notify_all()

    # -- loading --

    def _load(self, spec: ModelSpec, adapter: AdapterWeights | None = None) -> LoadedModel:
        """Load ``spec`` within the budget (evicting LRU idle models), retrying once after an OOM."""
        if spec.adapter_of and adapter is None:
            return self._load_adapter(spec)
        loaded = self._base_of(spec) if adapter is not None else spec  # an adapter's own copy of its base
        placement = self.placement_for(loaded)
        estimate = loaded.estimate_bytes(placement.dtype)
        self._reserve(spec.id, estimate)
        try:
            for attempt in (1, 2):
                started = time.perf_counter()
                try:
                    bundle = self._loader(loaded, self.resolve_location(loaded), placement)
                except MMDemoError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    if is_out_of_memory(exc) and attempt == 1:
                        log.warning("out of memory loading %s; evicting other models and retrying", spec.id)
                        self._evict_idle(keep=spec.id, needed=None)
                        continue
                    if is_out_of_memory(exc):
                        raise ModelOutOfMemoryError(
                            f"Model '{spec.id}' does not fit in {placement.device} memory, even with the other "
                            "models unloaded."
                        ) from None
                    log.exception("loading %s failed", spec.id)
                    raise ModelLoadError(spec.id, _describe_load_error(exc)) from exc
                seconds = time.perf_counter() - started
                log.info("loaded %s on %s/%s in %.2fs", spec.id, placement.device, placement.dtype, seconds)
                if adapter is not None:  # an adapter that replaces modules: merged into this copy of its base
                    self._adapt(spec, bundle, adapter)
                return LoadedModel(spec, bundle, placement, measure_bytes(bundle), seconds)
            raise AssertionError("unreachable")
        finally:
            with self._lock:
                self._reserved.pop(spec.id, None)

    # -- LoRA adapters (mmdemo.lora) --

    def _base_of(self, spec: ModelSpec) -> ModelSpec:
        """The catalog model the adapter ``spec`` applies to."""
        base = self.catalog.get(spec.adapter_of) if spec.adapter_of in self.catalog else None
        if base is None or base.adapter_of or base.task != spec.task:
            raise ModelLoadError(spec.id, f"it is a LoRA adapter of '{spec.adapter_of}', which is not a "
                                          f"{spec.task} model of the catalog (an adapter needs its base).")
        return base

    def _load_adapter(self, spec: ModelSpec) -> LoadedModel:
        """An adapter served on its base's loaded copy (the base loaded through the registry if needed, never
        twice): only the adapter's bytes count. The base stays held for the caller's first call."""
        base_spec = self._base_of(spec)
        started = time.perf_counter()
        try:
            weights = read_adapter(Path(self.resolve_location(spec)))
        except (OSError, AdapterFormatError) as exc:
            raise ModelLoadError(spec.id, f"its LoRA adapter cannot be read: {exc}") from exc
        if weights.needs_own_copy:
            return self._load(spec, adapter=weights)
        self._reserve(spec.id, weights.nbytes)
        try:
            base = self._acquire(base_spec.id, spec.task)
        finally:
            with self._lock:
                self._reserved.pop(spec.id, None)
        try:
            self._adapt(spec, base.model, weights)
        except BaseException:
            self._release(base)
            raise
        seconds = time.perf_counter() - started
        log.info("loaded LoRA adapter %s on %s in %.2fs", spec.id, base_spec.id, seconds)
        return LoadedModel(spec, base.model, base.placement, weights.nbytes, seconds, base=base, adapter=weights)

    @staticmethod
    def _adapt(spec: ModelSpec, bundle: Any, weights: AdapterWeights) -> None:
        try:
            serve_on(bundle, spec.id, weights)
        except AdapterFormatError as exc:
            raise ModelLoadError(spec.id, str(exc)) from exc

    def _unhook(self, entry: LoadedModel) -> None:
        if entry.base is not None and entry.adapter is not None and entry.in_use == 0:
            remove_from(entry.base.model, entry.spec.id, entry.adapter)

    def _drop(self, model_id: str) -> list[LoadedModel]:
        """Take ``model_id`` out of the loaded models, with the adapters served on it (lock held)."""
        entry = self._loaded.pop(model_id, None)
        if entry is None:
            return []
        dropped = [entry]
        for other in list(self._loaded.values()):
            if other.base is entry:
                dropped += self._drop(other.spec.id)
        self._unhook(entry)
        return dropped

    def resolve_location(self, spec: ModelSpec) -> str:
        """A local folder or a Hub id; ``tiny:`` sources are built on first use."""
        if spec.source_scheme == "tiny":
            if self._tiny_builder is None:
                raise ModelLoadError(spec.id, "this registry was built without tiny checkpoint builders.")
            name = spec.source_location
            return str(self._tiny_builder(self.settings.tiny_dir, names=[name])[name])
        if spec.source_scheme == "local-dir":
            folder = Path(spec.source_location)
            if not folder.is_dir():
                raise ModelLoadError(spec.id, f"the folder {folder} does not exist.")
            return str(folder)
        # A Hub model: from the Hub while it answers, else from the local cache, else a quick clear error
        # (rather than minutes of download retries).
        state = self.hub.state()
        if state.reachable:
            return spec.source_location
        snapshot = cached_snapshot(spec.source_location, spec.revision)
        if snapshot is not None:
            return str(snapshot)
        raise ModelLoadError(
            spec.id,
            f"the Hub cannot be reached ({state.reason}) and the model is not in the local cache. Choose a "
            "model that is available locally (see the Models tab), or download this one where the Hub can be "
            f"reached: hf download {spec.source_location}.",
        )

    def availability(self, spec: ModelSpec) -> str:
        """Where ``spec`` would load from now, without probing: "local" (a folder, a tiny build or the
        Hub cache), "hub" (a download) or "unavailable" (not cached, and the Hub did not answer)."""
        if spec.source_scheme == "local-dir":
            return "local" if Path(spec.source_location).is_dir() else "unavailable"
        if spec.source_scheme != "hf-hub" or cached_snapshot(spec.source_location, spec.revision) is not None:
            return "local"
        state = self.hub.last_known()
        return "unavailable" if state is not None and not state.reachable else "hub"

    def _reserve(self, model_id: str, estimate: int) -> None:
        """Promise ``estimate`` bytes to a load, evicting idle models (LRU first) to make room."""
        budget = self.budget_bytes
        if estimate > budget:
            raise MemoryBudgetError(
                f"Model '{model_id}' needs about {_gib(estimate)} but the memory budget is {_gib(budget)}. "
                "Raise MMDEMO_MEMORY_BUDGET or choose a smaller model."
            )
        deadline = time.monotonic() + self._busy_wait_seconds
        with self._lock:
            while True:
                self._evict_idle(keep=model_id, needed=estimate)
                if self.used_bytes() + estimate <= budget:
                    self._reserved[model_id] = estimate
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MemoryBudgetError(
                        f"Model '{model_id}' needs about {_gib(estimate)}, but the other models in the "
                        f"{_gib(budget)} budget are busy. Try again shortly."
                    )
                self._lock.wait(timeout=min(remaining, 1.0))

    def _evict_idle(self, keep: str | None, needed: int | None) -> list[str]:
        """Evict idle models, least recently used first, until ``needed`` more bytes fit (None: all)."""
        evicted = []
        with self._lock:
            budget = self.budget_bytes
            idle = sorted(
                (e for e in self._loaded.values() if e.in_use == 0 and e.spec.id != keep),
                key=lambda e: e.last_used,
            )
            for entry in idle:
                if needed is not None and self.used_bytes() + needed <= budget:
                    break
                if self._loaded.get(entry.spec.id) is entry:
                    evicted += [dropped.spec.id for dropped in self._drop(entry.spec.id)]
        if evicted:
            log.info("evicted %s", ", ".join(evicted))
            free_device_memory(self.device)
        return evicted

    # -- management --

    def preload(self, model_ids: Iterable[str]) -> None:
        """Load models now (e.g. at start-up) instead of at their first call."""
        for model_id in model_ids:
            self._release(self._acquire(model_id, None))

    def unload(self, model_id: str) -> bool:
        """Drop a loaded model and return its memory; False if it was not loaded.

        A model in the middle of a call is dropped from the registry at once and freed when the
        call ends.
        """
        self.catalog.get(model_id)
        with self._lock:
            dropped = self._drop(model_id)  # its adapters go with a base
        if not dropped:
            return False
        device = dropped[0].placement.device
        del dropped
        free_device_memory(device)
        return True

    def unload_all(self) -> None:
        for model_id in list(self._loaded):
            self.unload(model_id)

    def replace(self, model_id: str, source: str, revision: str | None = None) -> ModelSpec:
        """Hot-swap ``model_id`` to a new checkpoint; the old one serves until the new one is ready.

        If the new checkpoint fails to load, the old one stays and ``ModelLoadError`` is raised.
        """
        old_spec = self.catalog.get(model_id)
        new_spec = old_spec.with_source(source, revision)
        pending = self._loading.get(model_id)
        if pending is not None:
            pending.exception()  # let a first load of the old source finish before swapping
        entry = self._load(new_spec)
        with self._lock:
            if entry.base is not None:
                entry.base.in_use -= 1  # the load held the base for a first call that is not coming
            self.catalog.register(new_spec, override=True)
            old = self._loaded.get(model_id)
            if old is not None:
                entry.calls = old.calls
                for adapter in [e for e in self._loaded.values() if e.base is old]:
                    self._drop(adapter.spec.id)  # reloaded onto the new copy at their next call
            self._loaded[model_id] = entry
            self._errors.pop(model_id, None)
        if old is not None:
            del old
            free_device_memory(self.device)
        return new_spec

    def is_loaded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._loaded

    def status(self) -> dict[str, Any]:
        """What is loaded, where, how big, since when, and how often it was called."""
        now = time.monotonic()
        with self._lock:
            models = [
                {
                    "id": e.spec.id,
                    "task": e.spec.task,
                    "adapter_of": e.spec.adapter_of,
                    "source": e.spec.source,
                    "revision": e.spec.revision,
                    "device": e.placement.device,
                    "dtype": e.placement.dtype,
                    "memory_bytes": e.memory_bytes,
                    "load_seconds": round(e.load_seconds, 3),
                    "loaded_at": e.loaded_at,
                    "idle_seconds": round(now - e.last_used, 1),
                    "calls": e.calls,
                    "in_use": e.in_use,
                }
                for e in sorted(self._loaded.values(), key=lambda e: e.spec.id)
            ]
            return {
                "device": self._device or "not chosen yet",
                "budget_bytes": self._budget,
                "used_bytes": self.used_bytes(),
                "loaded": models,
                "loading": sorted(self._loading),
                "errors": dict(self._errors),
            }


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def _describe_load_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "offline" in lowered or "couldn't connect" in lowered or "connection" in lowered:
        return f"the Hub cannot be reached and the model is not in the local cache ({text[:200]})."
    if isinstance(exc, (FileNotFoundError, OSError)) and "no such file" in lowered:
        return f"files are missing ({text[:200]})."
    return f"{type(exc).__name__}: {text[:300]}"


def disk_usage_bytes(folder: Path) -> int:
    """Size of a model folder on disk (used for backends that do not hold torch tensors)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
