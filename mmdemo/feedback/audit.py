"""The audit log: who did which administrative action, on what, and when, as rows of the feedback store.

>>> audit = AuditLog(store)
>>> audit.record("alice", "preload", "blip-caption-base")
>>> audit.entries(action="preload", since=parse_since("2026-12-01"))      # newest first

Where the action is itself a write to the store (a deletion, a promotion, a campaign created), the row is
written in the same transaction with :func:`write_entry`, so that the action and its entry commit or fail
together. Other actions (an export, a preload) are recorded just after they are done with
:meth:`AuditLog.record_after`, which logs an error when the entry cannot be written.

``details`` holds ids, counts and model names, never what people typed (prompts, corrections, comments).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import Connection, insert, select

from ..errors import InvalidInputError
from .tables import audit_log

if TYPE_CHECKING:
    from .store import FeedbackStore

log = logging.getLogger(__name__)

ACTIONS = (
    "export",            # feedback exported (mmdemo export, the Models panel)
    "delete_feedback",   # a feedback record deleted (mmdemo delete --record)
    "delete_output",     # an output and all feedback on it deleted (mmdemo delete --output)
    "promote",           # a model made its task's default
    "rollback",          # a task's default rolled back
    "preload",           # a model loaded by an admin (Models panel)
    "unload",            # a model unloaded by an admin (Models panel)
    "finetune_start",    # a fine-tuning job queued
    "finetune_cancel",   # a fine-tuning job cancelled
    "finetune_resume",   # a failed job continued as a new one
    "annotate_create",   # an annotation campaign created
    "annotate_add",      # recorded outputs added to a campaign
    "annotate_import",   # a folder of media pre-labelled into a campaign
    "backup",            # a snapshot of the store taken (mmdemo backup)
)
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
HEADERS = ["when", "actor", "action", "target", "details"]  # the table the Models panel shows


@dataclass(frozen=True)
class AuditEntry:
    """One audited action: who (``actor``; None: unknown), what (``action``, ``target``), when, and
    ``details`` (ids, counts, model names)."""

    id: int
    created_at: datetime
    actor: str | None
    action: str
    target: str | None
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.created_at.isoformat(timespec="seconds"), "actor": self.actor,
                "action": self.action, "target": self.target, "details": self.details}

    def row(self) -> list[Any]:
        """The entry as a table row (:data:`HEADERS`)."""
        details = ", ".join(f"{key}={value}" for key, value in self.details.items())
        return [self.created_at.strftime("%Y-%m-%d %H:%M:%S"), self.actor or "unknown", self.action,
                self.target or "", details]

    def describe(self) -> str:
        """``2026-12-01 07:30:00 UTC  preload          blip-caption-base  by alice  {...}``."""
        when, actor, action, target, details = self.row()
        return f"{when} UTC  {action:<16} {target}  by {actor}" + (f"  ({details})" if details else "")


def write_entry(conn: Connection, actor: str | None, action: str, target: str | None = None,
                details: dict[str, Any] | None = None) -> int:
    """Add an entry in the caller's transaction ``conn`` (the action's own, when it writes the store)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    values = dict(created_at=datetime.now(timezone.utc), actor=(actor or None) and str(actor)[:200], action=action,
                  target=None if target is None else str(target)[:300], details=dict(details or {}))
    return conn.execute(insert(audit_log).values(**values)).inserted_primary_key[0]


class AuditLog:
    """The ``audit_log`` table of a :class:`FeedbackStore` (same database)."""

    def __init__(self, store: "FeedbackStore"):
        self.db = store.db

    def record(self, actor: str | None, action: str, target: str | None = None,
               details: dict[str, Any] | None = None) -> int:
        """Add an entry in a transaction of its own; its id. Raises the store's error when it cannot."""
        return self.db.run_write(lambda conn: write_entry(conn, actor, action, target, details))

    def entries(self, *, since: datetime | None = None, action: str | None = None, actor: str | None = None,
                limit: int | None = DEFAULT_LIMIT) -> list[AuditEntry]:
        """Entries newest first: on or after ``since`` (aware; text is read by the store's ``parse_since``,
        which imports this module), of one ``action``, by one ``actor``, at most ``limit``. Bad filters raise
        :class:`~mmdemo.errors.InvalidInputError`."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(check_limit(limit))
        if since is not None:
            query = query.where(audit_log.c.created_at >= since)
        if action:
            query = query.where(audit_log.c.action == check_action(action))
        if actor:
            query = query.where(audit_log.c.actor == actor.strip())
        with self.db.read() as conn:
            return [_entry(row) for row in conn.execute(query).mappings()]


def record_after(store: "FeedbackStore | Callable[[], FeedbackStore]", actor: str | None, action: str,
                 target: str | None = None, details: dict[str, Any] | None = None) -> bool:
    """Record an action already done outside the store (``store``: the store, or a callable that opens it);
    False, with the failure logged as an error, when the entry could not be written."""
    try:
        AuditLog(store() if callable(store) else store).record(actor, action, target, details)
        return True
    except Exception:  # noqa: BLE001 - the action is done: say loudly that it is not in the log
        log.exception("the audit log entry of %s %s by %s could not be written", action, target or "", actor)
        return False


def check_action(action: str) -> str:
    """``action`` if it is one of :data:`ACTIONS`, else :class:`InvalidInputError` naming them."""
    action = action.strip() if isinstance(action, str) else action
    if action not in ACTIONS:
        raise InvalidInputError(f"Unknown audit action {action!r}; choose one of: {', '.join(ACTIONS)}.",
                                field="action")
    return action


def check_limit(limit: Any) -> int:
    """A whole number of entries from 1 to :data:`MAX_LIMIT` (None: :data:`DEFAULT_LIMIT`)."""
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInputError(f"The limit must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}.",
                                field="limit")
    return limit


def _entry(row: Any) -> AuditEntry:
    values = dict(row)
    if values["created_at"].tzinfo is None:  # SQLite hands back naive UTC
        values["created_at"] = values["created_at"].replace(tzinfo=timezone.utc)
    values["details"] = values["details"] or {}
    return AuditEntry(**values)
