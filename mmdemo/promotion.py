"""Promoted default models: each task's default as the feedback store holds it, applied to one app process
(replica) with no downtime, and each model's lineage.

>>> defaults = ModelDefaults(settings, registry, lambda: store)
>>> defaults.promote("blip-ours", actor="alice")        # loaded here first, then recorded and switched to
>>> defaults.start()                                     # every few seconds: what other replicas promoted
>>> defaults.rollback("image-to-text", actor="alice")   # back to the default before it

Applying a change loads the new default through the registry first and switches the catalog's default
only once it is loaded, so the old one answers every request meanwhile; a model that cannot load here is
reported (:meth:`ModelDefaults.problems`) and the old default stays. The store is read every
``MMDEMO_DEFAULTS_POLL_S`` seconds (3 by default, 10 at most), so every replica (and every backend: SQLite or
PostgreSQL) applies a promotion within 10 s.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

from .catalog import Catalog, ModelSpec, read_model_folders
from .config import Settings
from .errors import MMDemoError
from .finetune.lineage import training_lineage
from .registry import ModelRegistry
from .tasks.spec import task_ids, task_spec

if TYPE_CHECKING:
    from .feedback import FeedbackStore
    from .feedback.promotions import PromotionRecord, PromotionStore

log = logging.getLogger(__name__)


class ModelDefaults:
    """The promoted default models of one replica: its ``registry``'s catalog follows the feedback store's
    (``store``: a callable, the store opens on first use)."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: Callable[[], "FeedbackStore"]):
        self.settings = settings
        self.registry = registry
        self._store = store
        self._sync_lock = threading.Lock()  # one change applied at a time
        self._problems: dict[str, tuple[str | None, str]] = {}  # task -> (the model asked for, why not applied)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def promotions(self) -> "PromotionStore":
        from .feedback.promotions import PromotionStore

        return PromotionStore(self._store())

    def promote(self, model_id: str, actor: str | None, task: str | None = None, *,
                apply_here: bool = True) -> "PromotionRecord":
        """Make catalog model ``model_id`` its task's default (``task``, if given, must be the one it
        serves), everywhere: it is loaded here first (a model that cannot load is refused, nothing changes),
        then recorded in the store and switched to here; the replicas follow within seconds.
        ``apply_here=False`` (a command, not a replica) only checks and records it."""
        spec = self.registry.catalog.get(model_id, task_spec(task).id if task else None)
        if apply_here:
            self.registry.preload([spec.id])
        record = self.promotions.promote(spec.task, spec.id, actor)
        if apply_here:
            self.sync()
        return record

    def rollback(self, task: str, actor: str | None, *, apply_here: bool = True) -> "PromotionRecord":
        """Return ``task`` to its default before the latest promotion (the catalog's own below the first),
        everywhere; here it is loaded before it is switched to (unless ``apply_here`` is False)."""
        record = self.promotions.rollback(task_spec(task).id, actor)
        if apply_here:
            self.sync()
        return record

    def sync(self) -> None:
        """Apply the store's promoted defaults here: each new default loaded, then switched to."""
        current = self.promotions.current()
        with self._sync_lock:
            for task in task_ids():
                self._apply(task, current.get(task))

    def problems(self) -> dict[str, str]:
        """Task -> why its promoted default is not applied here (the old default serves meanwhile)."""
        return {task: why for task, (_, why) in self._problems.items()}

    def start(self) -> threading.Thread:
        """Follow the store: apply its promoted defaults now, then every ``defaults_poll_s`` seconds."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="mmdemo-model-defaults", daemon=True)
            self._thread.start()
        return self._thread

    def close(self) -> None:
        """Stop following the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _follow(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - logged; the next poll tries again
                log.exception("reading the promoted default models failed")
            if self._stop.wait(self.settings.defaults_poll_s):
                return

    def _apply(self, task: str, wanted: str | None) -> None:
        catalog = self.registry.catalog
        if catalog.promoted(task) == wanted:
            self._problems.pop(task, None)
            return
        if task in self._problems and self._problems[task][0] == wanted:
            return  # reported; tried again when the store names another model
        try:
            if wanted is not None and wanted not in catalog:
                register_published(catalog, self.settings, wanted)  # published by another replica
            model_id = wanted or catalog.catalog_default(task).id
            catalog.get(model_id, task)
            self.registry.preload([model_id])  # the old default keeps answering while this loads
        except MMDemoError as exc:
            shown = wanted or "the catalog default"
            log.error("the promoted default of %s, %s, is not applied here (the old default stays): %s",
                      task, shown, exc)
            self._problems[task] = (wanted, f"{shown} could not be made the default here: {exc}")
            return
        catalog.set_default(task, wanted)
        self._problems.pop(task, None)
        log.info("the default model of %s is now %s", task, catalog.default_for(task).id)


def register_published(catalog: Catalog, settings: Settings, model_id: str) -> None:
    """Add ``model_id`` to ``catalog`` from the models folder (a model another replica fine-tuned on the
    shared data directory); the catalog's own error when there is no such folder."""
    for spec in read_model_folders(settings.models_dir):
        if spec.id == model_id:
            catalog.register(spec)
            return
    catalog.get(model_id)


def apply_promoted(catalog: Catalog, current: dict[str, str]) -> None:
    """The store's promoted defaults (:meth:`PromotionStore.current`) on ``catalog`` at once, without
    loading anything: for one-off commands (``mmdemo predict``). Models it lacks are left out."""
    for task, model_id in current.items():
        try:
            catalog.set_default(task, model_id)
        except MMDemoError as exc:
            log.warning("the promoted default of %s is not used: %s", task, exc)


def model_lineage(spec: ModelSpec, promotions: "PromotionStore") -> dict[str, Any]:
    """Where ``spec`` comes from: its training lineage (:func:`~mmdemo.finetune.lineage.training_lineage`:
    base, data fingerprint, records, metrics before/after; None for a model no job made) and who promoted
    it last and when (None if nobody did)."""
    promoted = promotions.last_promotion_of(spec.id)
    return {"model": spec.id, "task": spec.task, "training": training_lineage(spec),
            "promoted_by": promoted.actor if promoted else None,
            "promoted_at": promoted.created_at.strftime("%Y-%m-%d %H:%M:%S UTC") if promoted else None}


def describe_lineage(lineage: dict[str, Any]) -> str:
    """:func:`model_lineage` as Markdown (a list, then the before/after table), which reads as plain text too."""
    lines = [f"Lineage of {lineage['model']} ({lineage['task']})"]
    training = lineage["training"]
    if training is None:
        lines.append("- not fine-tuned here: a catalog model")
    else:
        records = training["records"]
        lines += [f"- base: {training['base']}",
                  f"- data fingerprint: {training['data_fingerprint']}",
                  f"- records used: {records.get('train', 0)} train, {records.get('validation', 0)} validation",
                  f"- trained: {training['trained_at'] or 'unknown'}"]
    if lineage["promoted_at"]:
        lines.append(f"- promoted by {lineage['promoted_by'] or 'unknown'} at {lineage['promoted_at']}")
    else:
        lines.append("- never promoted")
    table = training and training["before_after"]
    if not table:
        if training is not None:
            lines.append("- metrics before/after: none (nothing was scored)")
        return "\n".join(lines)
    lines.append(f"- metrics before/after, {table['source']}:")
    lines += ["", "| " + " | ".join(table["headers"]) + " |", "|" + "---|" * len(table["headers"])]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    if table["note"]:
        lines += ["", f"Note: {table['note']}"]
    return "\n".join(lines)
