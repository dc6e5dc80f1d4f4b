"""Starting, following and cancelling fine-tuning jobs from a running app (the Fine-tune panel, its API, the
server's start-up): :class:`JobControl`, one per app (``App.finetune``).

Jobs are processes of their own, queued in the feedback store and started by a
:class:`~.processes.JobRunner`, made on first use; nothing here imports the training code.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from ..config import Settings
from .adapters import adapter_for, finetune_adapters
from .config import LORA_DEFAULT_MIN_PARAMS_M, FinetuneConfig
from ..errors import InvalidInputError
from .errors import InvalidDatasetError, InvalidModelNameError, UnsupportedBaseError

if TYPE_CHECKING:
    from ..feedback import FeedbackStore
    from ..registry import ModelRegistry
    from .processes import JobRunner

# How a run trains (the form's choice and /finetune_start's ``training``): mode -> (lora, merge) of FinetuneConfig
TRAINING_MODES = {"auto": (None, False), "full": (False, False), "lora": (True, False), "merged": (True, True)}
TRAINING_HELP = (f"auto: a LoRA adapter for bases of {LORA_DEFAULT_MIN_PARAMS_M}M parameters or more, else full; "
                 "full: every weight; lora: a LoRA adapter, served on the base's loaded copy; merged: LoRA merged "
                 "into a full checkpoint")
DEFAULT_ONLY = "approved"  # the feedback a run trains on by default (as `mmdemo finetune`'s export has it)


class JobControl:
    """The app's fine-tuning jobs over its ``registry`` and feedback ``store`` (a callable: the store opens
    when the first job is asked about)."""

    def __init__(self, settings: Settings, registry: "ModelRegistry", store: Callable[[], "FeedbackStore"]):
        self.settings = settings
        self.registry = registry
        self._store = store
        self._runner: "JobRunner | None" = None
        self._lock = threading.Lock()

    @property
    def runner(self) -> "JobRunner":
        """The queue of job processes, made on first use (it opens the feedback store, where the jobs live,
        and from then on follows them)."""
        from .processes import JobRunner

        with self._lock:
            if self._runner is None:
                self._runner = JobRunner(self.settings, self._store(), self.registry)
            return self._runner

    def close(self) -> None:
        """Stop following the jobs (their processes go on; the next app, or the next use, follows them)."""
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()

    # -- what can be trained --

    @staticmethod
    def tasks() -> list[str]:
        """The tasks that can be fine-tuned (one adapter each)."""
        return list(finetune_adapters())

    def base_models(self, task: str | None) -> list[str]:
        """Catalog models of ``task`` whose kind its adapter trains (fine-tuned ones included)."""
        adapter = finetune_adapters().get(task or "")
        if adapter is None:
            return []
        return [spec.id for spec in self.registry.catalog if spec.task == task and spec.kind in adapter.kinds]

    def available(self, task: str, only: str | None = None) -> tuple[int, int]:
        """How many feedback records of ``task`` a run would learn from (``only``), and how many there are."""
        store = self._store()
        return store.count(task, only=only or DEFAULT_ONLY), store.count(task, only="all")

    def config_from(self, task: str | None, base: str | None, name: str | None, epochs: Any, lr: Any,
                    batch_size: Any, val_fraction: Any, only: str | None, training: Any = "auto") -> FinetuneConfig:
        """A run's configuration from a form's or an API call's values (typed errors for bad ones); the task
        defaults to the first that can be trained, the base to its first model; ``training`` is one of
        :data:`TRAINING_MODES` (empty: auto)."""
        if (training or "auto") not in TRAINING_MODES:
            raise InvalidInputError(f"Unknown training mode {training!r}: {TRAINING_HELP}.", "training")
        lora, merge = TRAINING_MODES[training or "auto"]
        task = task or next(iter(self.tasks()))
        if not base:
            bases = self.base_models(task)
            if not bases:
                raise UnsupportedBaseError(f"No catalog model can be fine-tuned for {task}.")
            base = bases[0]
        if not name:
            raise InvalidModelNameError("Give the new model a name: letters, digits, '.', '_' or '-'.")
        return FinetuneConfig(task, base=base, name=name, epochs=whole(epochs), lr=lr,
                              batch_size=whole(batch_size), val_fraction=val_fraction, only=only or DEFAULT_ONLY,
                              lora=lora, merge=merge)

    def check_ready(self, config: FinetuneConfig) -> int:
        """Refuse at once what the job would refuse after a while: a base that is unknown or of another task
        or kind, a name in use, no feedback to learn from. Returns how many feedback records match."""
        from .processes import check_new_model_name

        adapter_for(config.task).check_base(self.registry.catalog.get(config.base))
        check_new_model_name(self.registry.catalog, self.settings.models_dir, config.name, overwrite=config.overwrite)
        only = config.only or DEFAULT_ONLY
        available = self._store().count(config.task, only=only)
        if not available:
            raise InvalidDatasetError(
                f"There is no {only} feedback on {config.task} to train on yet: rate or correct some results first"
                + ("." if only == "all" else ", or choose all feedback."))
        adapter_for(config.task).check_feedback(self._store(), only)
        return available

    # -- the jobs --

    def start(self, config: FinetuneConfig, started_by: str | None) -> dict[str, Any]:
        """Check the run (:meth:`check_ready`), then queue it (audited: ``finetune_start``); its status."""
        self.check_ready(config)
        job = self.runner.submit(config, started_by)
        self._audit(started_by, "finetune_start", job)
        return self.runner.status(job.id)

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        """A job's status (default: the newest) and the queue."""
        return self.runner.status(job_id or None)

    def cancel(self, job_id: str | None = None, cancelled_by: str | None = None) -> dict[str, Any]:
        """Cancel a job (default: the newest waiting or running; audited: ``finetune_cancel``); its status."""
        job = self.runner.cancel(job_id or None)
        self._audit(cancelled_by, "finetune_cancel", job)
        return self.runner.status(job.id)

    def resume(self, job_id: str | None, started_by: str | None) -> dict[str, Any]:
        """Continue a failed job (default: the newest job) from its last checkpoint, as a new job (audited:
        ``finetune_resume``); its status."""
        job = self.runner.resume(job_id or None, started_by)
        self._audit(started_by, "finetune_resume", job)
        return self.runner.status(job.id)

    def _audit(self, actor: str | None, action: str, job: Any) -> None:
        from ..feedback.audit import record_after

        record_after(self._store, actor, action, job.name,
                     {"job_id": job.id, "task": job.task, "base": job.base, "device": job.device})

    def follow(self) -> None:
        """Start waiting jobs and publish the models of jobs that finished (at start-up, after a restart)."""
        self.runner.tick()


def whole(value: Any) -> Any:
    """2.0 -> 2 (JSON and number boxes send floats); anything else as it is, for the config to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
