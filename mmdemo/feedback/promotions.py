"""Each task's promoted default model, as rows of the feedback store, so that every replica (and every
backend) applies a promotion.

>>> promotions = PromotionStore(store)
>>> promotions.promote("image-to-text", "blip-ours", actor="alice")   # blip-ours is the caption default
>>> promotions.current()                                                # {"image-to-text": "blip-ours"}
>>> promotions.rollback("image-to-text", actor="alice")                # back to the default before it
>>> promotions.history("image-to-text")                                 # newest first

The rows are a history: a promotion pushes a model onto its task's stack of defaults, a rollback pops the
top one; each is also an entry of the audit log, written in the same transaction. The latest row of a task
names its default now (``model_id`` None: the catalog's own default,
once every promotion was rolled back). Whether a model exists and serves the task is the caller's check
(the catalog's), before it promotes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, func, insert, select, text

from .audit import write_entry
from .errors import PromotionError
from .store import FeedbackStore
from .tables import model_promotions

PROMOTE, ROLLBACK = "promote", "rollback"
_ADVISORY_LOCK_KEY = 0x6D6D64656D6F0004  # "mmdemo" + 4: one promotion or rollback at a time (PostgreSQL)


@dataclass(frozen=True)
class PromotionRecord:
    """One promotion or rollback: the task's default after it (``model_id``; None: the catalog's own) and
    before it, who did it and when."""

    id: int
    task: str
    action: str
    model_id: str | None
    previous_model_id: str | None
    actor: str | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "action": self.action, "model": self.model_id,
                "previous_model": self.previous_model_id, "by": self.actor,
                "at": self.created_at.isoformat(timespec="seconds")}

    def describe(self) -> str:
        """``2026-12-01 06:30 UTC  promote  blip-base -> blip-ours  by alice``."""
        when = self.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        shown = [name or "(catalog default)" for name in (self.previous_model_id, self.model_id)]
        return f"{when}  {self.action:<8}  {shown[0]} -> {shown[1]}  by {self.actor or 'unknown'}"


class PromotionStore:
    """The ``model_promotions`` table of a :class:`FeedbackStore` (same database)."""

    def __init__(self, store: FeedbackStore):
        self.db = store.db

    def promote(self, task: str, model_id: str, actor: str | None) -> PromotionRecord:
        """Make ``model_id`` the default of ``task``; :class:`PromotionError` when it already is."""
        def work(conn: Connection) -> int:
            stack = self._stack(conn, task)
            previous = stack[-1] if stack else None
            if previous == model_id:
                raise PromotionError(f"'{model_id}' is already the default model of {task}.")
            write_entry(conn, actor, PROMOTE, model_id, {"task": task, "previous_model": previous})
            return self._insert(conn, task, PROMOTE, model_id, previous, actor)

        return self.get(self.db.run_write(work))

    def rollback(self, task: str, actor: str | None) -> PromotionRecord:
        """Return ``task`` to the default before its latest promotion (the catalog's own below the first);
        :class:`PromotionError` when no promotion is left to roll back."""
        def work(conn: Connection) -> int:
            stack = self._stack(conn, task)
            if not stack:
                raise PromotionError(f"{task} has no promoted model to roll back: it uses the catalog's default.")
            now = stack[-2] if len(stack) > 1 else None
            write_entry(conn, actor, ROLLBACK, task, {"model": now, "previous_model": stack[-1]})
            return self._insert(conn, task, ROLLBACK, now, stack[-1], actor)

        return self.get(self.db.run_write(work))

    def current(self) -> dict[str, str]:
        """Task -> its promoted default, for the tasks that have one now."""
        latest = (select(model_promotions.c.task, func.max(model_promotions.c.id).label("id"))
                  .group_by(model_promotions.c.task).subquery())
        query = (select(model_promotions.c.task, model_promotions.c.model_id)
                 .join(latest, model_promotions.c.id == latest.c.id))
        with self.db.read() as conn:
            return {task: model for task, model in conn.execute(query) if model is not None}

    def history(self, task: str | None = None, *, limit: int = 50) -> list[PromotionRecord]:
        """Promotions and rollbacks of ``task`` (every task when None), newest first."""
        query = select(model_promotions).order_by(model_promotions.c.id.desc()).limit(limit)
        if task is not None:
            query = query.where(model_promotions.c.task == task)
        with self.db.read() as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def last_promotion_of(self, model_id: str) -> PromotionRecord | None:
        """The latest promotion of ``model_id`` (who promoted it and when), None if it never was."""
        query = (select(model_promotions).where(model_promotions.c.model_id == model_id,
                                                model_promotions.c.action == PROMOTE)
                 .order_by(model_promotions.c.id.desc()).limit(1))
        with self.db.read() as conn:
            row = conn.execute(query).mappings().first()
        return _record(row) if row is not None else None

    def get(self, record_id: int) -> PromotionRecord:
        with self.db.read() as conn:
            row = conn.execute(select(model_promotions).where(model_promotions.c.id == record_id)).mappings().one()
        return _record(row)

    def _stack(self, conn: Connection, task: str) -> list[str]:
        """The task's defaults, bottom (first promoted) to top (now), replayed from its history; read under
        a lock, so that two replicas promoting at once do not both build on the same top."""
        if not self.db.is_sqlite:  # SQLite: the write transaction already holds the database's write lock
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        rows = conn.execute(select(model_promotions.c.action, model_promotions.c.model_id)
                            .where(model_promotions.c.task == task).order_by(model_promotions.c.id))
        stack: list[str] = []
        for action, model_id in rows:
            if action == PROMOTE:
                stack.append(model_id)
            elif stack:
                stack.pop()
        return stack

    @staticmethod
    def _insert(conn: Connection, task: str, action: str, model_id: str | None, previous: str | None,
                actor: str | None) -> int:
        values = dict(task=task, action=action, model_id=model_id, previous_model_id=previous, actor=actor,
                      created_at=datetime.now(timezone.utc))
        return conn.execute(insert(model_promotions).values(**values)).inserted_primary_key[0]


def _record(row: Any) -> PromotionRecord:
    values = dict(row)
    if values["created_at"].tzinfo is None:  # SQLite hands back naive UTC
        values["created_at"] = values["created_at"].replace(tzinfo=timezone.utc)
    return PromotionRecord(**values)
