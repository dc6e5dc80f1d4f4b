"""Fine-tuning jobs as rows of the feedback store, so that every replica (and an app restarted) sees them.

>>> jobs = FinetuneJobStore(store)
>>> job = jobs.create("blip-ours", "image-to-text", "blip-caption-base", "cpu", config, created_by="alice")
>>> jobs.claim(job.id, pid=1234, host="web-1", log_path="...")   # pending -> running, by whoever starts it
>>> jobs.report(job.id, {"stage": "training", "step": 3, ...})    # the job's process, as it goes
>>> jobs.finish(job.id, "succeeded", result={...})

The job's process writes its own progress and final state; the server that started it (or any replica)
only starts pending jobs, one per device, in the order they were created, and records how a process
that died without saying so ended (:meth:`FinetuneJobStore.finish` with ``only_if_active``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import insert, select, update

from .errors import StoreError
from .store import FeedbackStore
from .tables import finetune_jobs

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
ACTIVE = (PENDING, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    """One fine-tuning job as the store holds it."""

    id: str
    name: str
    task: str
    base: str
    device: str
    config: dict[str, Any]
    state: str
    pid: int | None
    host: str | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    exit_code: int | None
    error: str | None
    log_path: str | None
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class FinetuneJobStore:
    """The ``finetune_jobs`` table of a :class:`FeedbackStore` (same database)."""

    def __init__(self, store: FeedbackStore):
        self.db = store.db

    def create(self, name: str, task: str, base: str, device: str, config: dict[str, Any], *,
               created_by: str | None = None) -> JobRecord:
        """A new pending job, queued after those already waiting for ``device``."""
        job_id = uuid.uuid4().hex[:16]
        values = dict(id=job_id, name=name, task=task, base=base, device=device, config=config, state=PENDING,
                      progress={"stage": "queued"}, created_by=created_by, created_at=_now())
        self.db.run_write(lambda conn: conn.execute(insert(finetune_jobs).values(**values)))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self.db.read() as conn:
            row = conn.execute(select(finetune_jobs).where(finetune_jobs.c.id == str(job_id))).mappings().first()
        if row is None:
            raise StoreError(f"There is no fine-tuning job '{job_id}' in {self.db.describe()}.")
        return _record(row)

    def list(self, *, states: tuple[str, ...] | None = None, limit: int = 50) -> list[JobRecord]:
        """Jobs, oldest first (the queue's order); ``states`` keeps only those."""
        query = select(finetune_jobs).order_by(finetune_jobs.c.created_at, finetune_jobs.c.id)
        if states is not None:
            query = query.where(finetune_jobs.c.state.in_(states))
        else:  # the newest ``limit``, still oldest first
            query = query.order_by(None).order_by(finetune_jobs.c.created_at.desc(), finetune_jobs.c.id.desc())
            query = query.limit(limit)
        with self.db.read() as conn:
            rows = [_record(row) for row in conn.execute(query).mappings()]
        return rows if states is not None else rows[::-1]

    def latest(self) -> JobRecord | None:
        jobs = self.list(limit=1)
        return jobs[0] if jobs else None

    def claim(self, job_id: str, *, pid: int | None, host: str, log_path: str) -> bool:
        """pending -> running for the process ``pid``; False when someone else started (or cancelled) it."""
        return self._update(job_id, (PENDING,), state=RUNNING, pid=pid, host=host, log_path=log_path,
                            started_at=_now(), progress={"stage": "starting"})

    def set_pid(self, job_id: str, pid: int) -> None:
        """The process that runs the job, once started."""
        self._update(job_id, ACTIVE, pid=pid)

    def report(self, job_id: str, progress: dict[str, Any]) -> None:
        """The job's process says where it is (only while the job is running)."""
        self._update(job_id, (RUNNING,), progress=progress)

    def finish(self, job_id: str, state: str, *, error: str | None = None, result: dict[str, Any] | None = None,
               exit_code: int | None = None, progress: dict[str, Any] | None = None) -> bool:
        """The job's final state (once: False when it had already ended)."""
        if state not in FINAL:
            raise ValueError(f"not a final state: {state}")
        values: dict[str, Any] = dict(state=state, error=error, finished_at=_now())
        for key, value in (("result", result), ("exit_code", exit_code), ("progress", progress)):
            if value is not None:
                values[key] = value
        return self._update(job_id, ACTIVE, **values)

    def set_exit_code(self, job_id: str, exit_code: int) -> None:
        """How the job's process exited, recorded after the process itself wrote the final state."""
        self.db.run_write(lambda conn: conn.execute(
            update(finetune_jobs).where(finetune_jobs.c.id == job_id, finetune_jobs.c.exit_code.is_(None))
            .values(exit_code=exit_code)))

    def _update(self, job_id: str, from_states: tuple[str, ...], **values: Any) -> bool:
        statement = (update(finetune_jobs)
                     .where(finetune_jobs.c.id == job_id, finetune_jobs.c.state.in_(from_states)).values(**values))
        return self.db.run_write(lambda conn: conn.execute(statement).rowcount) == 1


def _record(row: Any) -> JobRecord:
    values = dict(row)
    for key in ("created_at", "started_at", "finished_at"):
        if values[key] is not None and values[key].tzinfo is None:  # SQLite hands back naive UTC
            values[key] = values[key].replace(tzinfo=timezone.utc)
    return JobRecord(**values)


def _now() -> datetime:
    return datetime.now(timezone.utc)
