"""The feedback store: model outputs, people's feedback on them, and the media both point to.

>>> store = FeedbackStore.from_settings(settings)
>>> output_id = store.record_output("image-to-text", inputs={"image": "cat.jpg"}, output=result)
>>> saved = store.add_feedback(output_id, annotator="alice", thumbs=-1, correction="a black cat")
>>> saved.message
'Saved #1'

Two kinds of rows. An *output* is recorded when a task produces a result (its task, model and
revision, settings, input media by content hash, text inputs, the model's output, app version and
session); its id goes back to the caller with the result. *Feedback* is a person's thumbs, correction
and comment on an output: one record per (output, annotator), so saving twice updates the same record.

Guarantees:

* Everything is checked before anything is written; media files are written (atomically) before
  the transaction that refers to them, and that transaction is durable when a method returns.
* No path comes from a person: media are stored by content hash (see :mod:`.media_store`).
* Deleting (admins only) removes the record, its output when no other record is about it, and the
  media files no remaining output uses.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

from sqlalchemy import Connection, Select, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from .. import __version__
from ..errors import InvalidInputError
from ..media import DEFAULT_LIMITS, MediaLimits
from .audit import write_entry
from .database import Database, sqlite_url
from .errors import (
    ExpiredOutputError,
    InvalidFeedbackError,
    PermissionDeniedError,
    RecordNotFoundError,
    UnknownOutputError,
    UnusableStoreError,
)
from .media_store import MediaStore, PreparedMedia
from .migrations import migrate
from .records import FeedbackRecord, OutputRecord, SavedFeedback
from .schemas import (
    TaskSchema,
    clean_annotator,
    clean_comment,
    clean_thumbs,
    schema_for,
    split_request,
    to_json,
)
from .tables import (Timestamp, comparison_votes, comparisons, feedback, media, output_media, outputs,
                     schema_migrations)

if TYPE_CHECKING:
    from ..tasks import Prediction

Only = Literal["corrected", "approved", "all"]
ONLY_CHOICES: tuple[str, ...] = ("corrected", "approved", "all")
DEFAULT_OUTPUT_TTL_DAYS = 30.0
ADMIN_ROLE = "admin"
MAX_SETTINGS_BYTES = 64 * 1024
_OUTPUT_ID = re.compile(r"[0-9a-f]{32}")
MEDIA_CHECKED_AT_OPEN = 20  # media rows whose files are looked for when the store opens


def new_output_id() -> str:
    """A new output id: 32 random hexadecimal digits."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Deleted:
    """What a delete removed."""

    feedback_ids: tuple[int, ...]
    output_ids: tuple[str, ...]
    media_refs: tuple[str, ...]


class FeedbackStore:
    """Outputs, feedback and media over SQLAlchemy: SQLite in the data directory, or PostgreSQL.

    ``database_url``: None for ``sqlite:///<data_dir>/feedback.db``, or a SQLAlchemy URL
    (``postgresql://user:pass@host/db`` for app replicas that share one store).
    ``output_ttl_days``: how long an output stays open for feedback (None: forever).
    Migrations run when the store opens (``migrate=False`` to skip them).

    Opening refuses (:class:`~mmdemo.feedback.errors.UnusableStoreError`, saying how to recover) a
    database file that is empty, damaged or not SQLite, a database holding another application's tables,
    and a media folder that is missing while records refer to it; a path with no file makes a new store.
    """

    def __init__(
        self,
        database_url: str | None,
        data_dir: Path,
        *,
        limits: MediaLimits = DEFAULT_LIMITS,
        output_ttl_days: float | None = DEFAULT_OUTPUT_TTL_DAYS,
        app_version: str = __version__,
        pool_size: int = 16,
        migrate: bool = True,
    ):
        self.data_dir = Path(data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(database_url or sqlite_url(self.data_dir / "feedback.db"), pool_size=pool_size)
        self.media = MediaStore(self.data_dir / "media", limits)
        self.output_ttl = timedelta(days=output_ttl_days) if output_ttl_days else None
        self.app_version = app_version
        self._sql = _Statements(self.db.is_sqlite)
        try:
            self.db.check_readable()
            if migrate:
                self.migrate()
            self._check_media_folder()
        except BaseException:
            self.db.dispose()
            raise

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "FeedbackStore":
        """The store a running app uses: ``settings.database_url`` (or ``MMDEMO_DATABASE_URL``),
        ``settings.data_dir``, and the upload limits of ``settings``."""
        url = getattr(settings, "database_url", None) or os.environ.get("MMDEMO_DATABASE_URL") or None
        kwargs.setdefault("limits", MediaLimits(
            max_image_pixels=settings.max_image_pixels,
            max_upload_bytes=settings.max_upload_bytes,
            max_audio_seconds=settings.max_audio_seconds,
        ))
        ttl = getattr(settings, "feedback_ttl_days", None)
        if ttl is not None:
            kwargs.setdefault("output_ttl_days", float(ttl) or None)
        return cls(url, settings.data_dir, **kwargs)

    def migrate(self) -> list[str]:
        """Apply pending schema migrations; return their names."""
        return migrate(self.db)

    def close(self) -> None:
        self.db.dispose()

    def ping(self) -> None:
        """Raise :class:`StoreError` (with the reason) unless the database answers a query now."""
        with self.db.read() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _check_media_folder(self) -> None:
        """Refuse to open when records refer to media but the media folder is missing (or holds none of
        the first files looked for): the sweep would otherwise treat every new file as the only ones."""
        with self.db.read() as conn:
            if not self.db.engine.dialect.has_table(conn, media.name):
                return
            refs = conn.execute(select(media.c.ref).limit(MEDIA_CHECKED_AT_OPEN)).scalars().all()
        if not refs or any(self.media.exists(ref) for ref in refs):
            return
        state = "is missing" if not self.media.root.is_dir() else f"holds none of the {len(refs)} files looked for"
        raise UnusableStoreError(
            f"The feedback database {self.db.describe()} has records with images or audio, but the media folder "
            f"{self.media.root} {state}. Put the media folder back (restore it from a backup, or mount the volume "
            "that holds it), or point MMDEMO_DATA_DIR at the data directory it is in; mmdemo will not open the "
            "store without it.")

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeedbackStore({self.db.describe()}, media={self.media.root})"

    # --- outputs ---------------------------------------------------------------------------------

    def record_output(
        self,
        task: str,
        *,
        inputs: Mapping[str, Any],
        output: Mapping[str, Any],
        model: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        session: str | None = None,
        output_id: str | None = None,
    ) -> str:
        """Record a task's result as the app showed it; return its ``output_id`` (32 hex digits).

        ``inputs``: the task's inputs: ``image`` or ``audio`` (a path, bytes, a PIL image...) and text
        fields (``question``, ``labels``, ``prompt``, ``negative_prompt``, ``prefix``, ``language``).
        ``output``: the task's result as :func:`mmdemo.tasks.run` returned it (text-to-image: with its
        PIL ``images``); its ``model`` entry is used when ``model`` is not given.
        ``settings``: the generation settings used. ``session``: who asked (annotator id).
        ``output_id``: an id issued beforehand (:func:`new_output_id`), when the caller handed it out
        before recording (the app records in the background); a new one by default.

        Raises :class:`~mmdemo.feedback.errors.UnknownTaskError` and other ``InvalidInputError``
        subclasses (oversized media, bad fields) before anything is written.
        """
        schema = schema_for(task)
        media_source, text_inputs = schema.clean_inputs(inputs)
        return self._record(schema, media_source, text_inputs, output, model, settings, session, output_id)

    def record_prediction(self, prediction: "Prediction", *, session: str | None = None,
                          output_id: str | None = None) -> str:
        """Record a :class:`mmdemo.tasks.Prediction` (``mmdemo.tasks.predict(..., record=...)`` hands them
        here); return its ``output_id``. The inputs and settings are the validated request's, kept as the
        task checked them; the input media is the one the person sent (decoded once: the task's decode is
        reused)."""
        schema = schema_for(prediction.task)
        text_inputs, settings = schema.recorded_fields(prediction.request)
        return self._record(schema, prediction.media, text_inputs, prediction.result, None, settings, session,
                            output_id)

    def _record(self, schema: TaskSchema, media_source: Any, text_inputs: dict[str, Any], output: Mapping[str, Any],
                model: Mapping[str, Any] | None, settings: Mapping[str, Any] | None, session: str | None,
                output_id: str | None) -> str:
        # 1. check everything, encode the media; nothing is written yet
        if output_id is not None and not _OUTPUT_ID.fullmatch(str(output_id)):
            raise InvalidInputError("An output id is 32 lowercase hexadecimal digits.")
        if schema.media_input and media_source is None:
            raise InvalidInputError(f"{schema.task} needs its input {schema.media_input}.")
        output_data, output_media_sources = schema.clean_output(output)
        model = model if model is not None else (output.get("model") or {})
        if not isinstance(model, Mapping):
            raise InvalidInputError("The model info must be a dict with id, revision and backend.")
        model = dict(model)
        if session is not None:
            session = clean_annotator(session)
        row_json = {
            "model_info": to_json(model, "model info", MAX_SETTINGS_BYTES),
            "settings": to_json(dict(settings or {}), "settings", MAX_SETTINGS_BYTES),
            "inputs": to_json(text_inputs, "inputs"),
            "output": to_json(output_data, "model output"),
        }
        inputs_media: list[PreparedMedia] = []
        if media_source is not None:
            prepare = self.media.prepare_audio if schema.media_input == "audio" else self.media.prepare_image
            inputs_media.append(prepare(media_source))
        outputs_media = [self.media.prepare_image(image) for image in output_media_sources]
        all_media = {m.ref: m for m in (*inputs_media, *outputs_media)}
        output_id = output_id or new_output_id()
        now = _now()
        row = {
            "id": output_id,
            "task": schema.task,
            "model_id": _short(model.get("id"), 300),
            "model_revision": _short(model.get("revision"), 100),
            "backend": _short(model.get("backend"), 64),
            **{name: json.loads(value) for name, value in row_json.items()},
            "input_key": schema.input_key([m.ref for m in inputs_media], text_inputs),
            "session": session,
            "app_version": self.app_version,
            "created_at": now,
            "expires_at": now + self.output_ttl if self.output_ttl else None,
        }
        links = [{"output_id": output_id, "role": role, "position": i, "media_ref": m.ref}
                 for role, items in (("input", inputs_media), ("output", outputs_media))
                 for i, m in enumerate(items)]

        # 2. media files, durable before any row points to them
        for item in all_media.values():
            self.media.write(item)

        # 3. one transaction: media rows (locked, in order), the output and its links
        def work(conn: Connection) -> None:
            for ref in sorted(all_media):
                item = all_media[ref]
                if not self.media.exists(ref):  # deleted by an admin since step 2: write it again
                    self.media.write(item)
                size = self.media.path_for(ref).stat().st_size
                conn.execute(self._sql.upsert_media, {"b_ref": ref, "b_kind": item.kind, "b_size": size, "b_now": now})
            conn.execute(outputs.insert(), row)
            if links:
                conn.execute(output_media.insert(), links)

        self.db.run_write(work)
        return output_id

    def record_result(
        self, task: str, request: Mapping[str, Any], result: Mapping[str, Any], *, session: str | None = None,
        output_id: str | None = None,
    ) -> str:
        """:meth:`record_output` for a UI or API handler: ``request`` is the keyword inputs the task
        ran with (as passed to :func:`mmdemo.tasks.run`), ``result`` what it returned.

        >>> result = run(registry, "image-to-text", image=upload, max_new_tokens=30)
        >>> result["output_id"] = store.record_result("image-to-text", {"image": upload, "max_new_tokens": 30}, result)
        """
        inputs, settings = split_request(task, request)
        return self.record_output(task, inputs=inputs, output=result, settings=settings, session=session,
                                  output_id=output_id)

    def get_output(self, output_id: str) -> OutputRecord:
        """The recorded output, expired or not; :class:`UnknownOutputError` if there is none."""
        output_id = _check_output_id(output_id)
        with self.db.read() as conn:
            return self._load_output(conn, output_id)

    # --- feedback --------------------------------------------------------------------------------

    def add_feedback(
        self,
        output_id: str,
        *,
        annotator: str,
        thumbs: int | None = None,
        correction: Any = None,
        comment: str | None = None,
        on_saved: Callable[[Connection, SavedFeedback], None] | None = None,
    ) -> SavedFeedback:
        """Save ``annotator``'s feedback on an output; idempotent per (output, annotator).

        ``thumbs``: +1 or -1. ``correction``, by task: the corrected caption / answer / transcript
        (text); the right label(s) (a list, or text with commas); for text-to-image
        ``{"image_ratings": [1-5 or None per image], "preferred": index or None}``.
        ``comment``: free text (an empty one counts as none).

        ``on_saved(conn, saved)`` runs inside the same transaction once the record is written (the
        annotation queue marks the item done there); whatever it raises undoes the save.
        A second save by the same annotator updates the first record (same id, ``created=False``);
        fields left None keep what the earlier save gave. The record is on disk when this returns.
        Raises :class:`UnknownOutputError` / :class:`ExpiredOutputError` for an output that cannot be
        rated, :class:`InvalidFeedbackError` for a bad rating, correction, comment or annotator.
        """
        output_id = _check_output_id(output_id)
        annotator = clean_annotator(annotator)
        thumbs = clean_thumbs(thumbs)
        comment = clean_comment(comment)
        if thumbs is None and correction is None and comment is None:
            raise InvalidFeedbackError("Nothing to save: give a thumbs up or down, a correction or a comment.")

        def work(conn: Connection) -> SavedFeedback:
            state = conn.execute(self._sql.output_state, {"id": output_id}).first()
            if state is None:
                raise UnknownOutputError(_unknown_output(output_id))
            task, expires_at, images = state
            now = _now()
            if expires_at is not None and _utc(expires_at) <= now:
                raise ExpiredOutputError(
                    f"Output {output_id} expired on {_utc(expires_at):%Y-%m-%d %H:%M} UTC; outputs take feedback "
                    "for a limited time. Run the model again to rate a new result."
                )
            fixed = None
            if correction is not None:
                schema = schema_for(task)
                fixed = schema.clean_correction(correction, images)
                schema.check_correction(fixed, conn.execute(self._sql.output_json, {"id": output_id}).scalar_one())
            values = {"b_output_id": output_id, "b_annotator": annotator, "b_thumbs": thumbs, "b_correction": fixed,
                      "b_comment": comment, "b_app_version": self.app_version, "b_now": now}
            new_id = conn.execute(self._sql.insert_feedback, values).scalar()
            if new_id is not None:
                saved = SavedFeedback(int(new_id), output_id, True)
            else:
                record_id = conn.execute(self._sql.update_feedback, values).scalar_one()
                saved = SavedFeedback(int(record_id), output_id, False)
            if on_saved is not None:
                on_saved(conn, saved)
            return saved

        try:
            return self.db.run_write(work)
        except Exception as exc:
            if isinstance(exc.__cause__, IntegrityError):  # the output was deleted at this very moment
                raise UnknownOutputError(_unknown_output(output_id)) from exc
            raise

    def get(self, record_id: int) -> FeedbackRecord:
        """One feedback record with its output; :class:`RecordNotFoundError` if there is none."""
        for record in self._iter(_feedback_query().where(feedback.c.id == _check_record_id(record_id)), 1):
            return record
        raise RecordNotFoundError(f"There is no feedback record #{record_id}.")

    def count(self, task: str | None = None, *, only: Only = "all", since: Any = None) -> int:
        """How many feedback records match (see :meth:`iter_records`)."""
        query = select(func.count()).select_from(feedback.join(outputs))
        query = _filtered(query, task, only, since)
        with self.db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def iter_records(
        self,
        task: str | None = None,
        *,
        only: Only = "all",
        since: Any = None,
        max_id: int | None = None,
        batch_size: int = 500,
    ) -> Iterator[FeedbackRecord]:
        """Feedback records in id order, read ``batch_size`` at a time (memory stays flat).

        ``only``: ``corrected`` (records with a correction), ``approved`` (a correction or a thumbs
        up: a person confirmed the target), ``all``. ``since``: a date, datetime or ISO text; records
        saved (or last updated) at or after it. ``max_id``: stop after this record id.
        Each batch is its own short transaction, so a long export never blocks writers.
        """
        query = _filtered(_feedback_query(), task, only, since)
        if max_id is not None:
            query = query.where(feedback.c.id <= max_id)
        return self._iter(query, batch_size)

    def last_record_id(self) -> int:
        """The highest feedback record id (0 when there is none): an export reads up to it."""
        with self.db.read() as conn:
            return int(conn.execute(select(func.coalesce(func.max(feedback.c.id), 0))).scalar_one())

    # --- deleting --------------------------------------------------------------------------------

    def delete_feedback(self, record_id: int, *, actor_role: str, actor: str | None = None) -> Deleted:
        """Delete a feedback record (admins only). Its output goes too when no other record is about
        it, and with it the media files no remaining output uses (for data-subject requests). The audit
        log records it (by ``actor``) in the same transaction."""
        _require_admin(actor_role)
        record_id = _check_record_id(record_id)

        def work(conn: Connection, trash: list[tuple[Path, str]]) -> Deleted:
            output_id = conn.execute(
                select(feedback.c.output_id).where(feedback.c.id == record_id).with_for_update()
            ).scalar()
            if output_id is None:
                raise RecordNotFoundError(f"There is no feedback record #{record_id}.")
            conn.execute(delete(feedback).where(feedback.c.id == record_id))
            if conn.execute(select(exists().where(feedback.c.output_id == output_id))).scalar():
                deleted = Deleted((record_id,), (), ())
            else:
                rest = self._delete_output_rows(conn, output_id, trash)
                deleted = Deleted((record_id, *rest.feedback_ids), rest.output_ids, rest.media_refs)
            _audit_deletion(conn, actor, "delete_feedback", str(record_id), deleted)
            return deleted

        return self._delete(work)

    def delete_output(self, output_id: str, *, actor_role: str, actor: str | None = None) -> Deleted:
        """Delete an output with all feedback on it and its unshared media (admins only); the audit log
        records it (by ``actor``) in the same transaction."""
        _require_admin(actor_role)
        output_id = _check_output_id(output_id)

        def work(conn: Connection, trash: list[tuple[Path, str]]) -> Deleted:
            if conn.execute(select(outputs.c.id).where(outputs.c.id == output_id).with_for_update()).first() is None:
                raise UnknownOutputError(_unknown_output(output_id))
            deleted = self._delete_output_rows(conn, output_id, trash)
            _audit_deletion(conn, actor, "delete_output", output_id, deleted)
            return deleted

        return self._delete(work)

    def purge_expired_outputs(self, batch_size: int = 200) -> int:
        """Delete outputs past their expiry that nobody gave feedback on (or voted on), with their unshared media.

        Every result the app shows is recorded (so that it can be rated); this forgets the ones that
        were not. Run it at start-up or daily. Returns how many outputs were deleted.
        """
        total = 0
        while True:
            with self.db.read() as conn:
                ids = conn.execute(
                    select(outputs.c.id)
                    .where(outputs.c.expires_at <= _now(), ~exists().where(feedback.c.output_id == outputs.c.id),
                           ~_voted_on(outputs.c.id))
                    .limit(batch_size)
                ).scalars().all()
            if not ids:
                return total

            def work(conn: Connection, trash: list[tuple[Path, str]], ids: Sequence[str] = ids) -> Deleted:
                removed: list[str] = []
                for output_id in ids:
                    if conn.execute(select(exists().where(feedback.c.output_id == output_id)
                                           | _voted_on(output_id))).scalar():
                        continue  # rated (or voted on) since we looked
                    removed.extend(self._delete_output_rows(conn, output_id, trash).output_ids)
                return Deleted((), tuple(removed), ())

            total += len(self._delete(work).output_ids)

    def sweep_media(self, older_than: float = 3600.0) -> list[str]:
        """Remove media files no output refers to (left by a crash between a media write and its
        record, or by an interrupted delete) that are older than ``older_than`` seconds."""
        with self.db.read() as conn:
            referenced = set(conn.execute(select(media.c.ref)).scalars())
            created = conn.execute(select(func.min(schema_migrations.c.applied_at))).scalar()
        # A file older than the database was not written for it (a database moved aside, a new one made
        # beside the old media folder): it is kept.
        written_after = _utc(created).timestamp() if created is not None else None
        return self.media.sweep(referenced, older_than, written_after=written_after)

    def media_path(self, ref: str) -> Path:
        """The file of a media ref (validated: a ref can never name a path outside the media folder)."""
        return self.media.path_for(ref)

    def integrity_check(self) -> str:
        """``ok`` or what is wrong with the database (SQLite's integrity and foreign key checks)."""
        return self.db.integrity_check()

    # --- internals -------------------------------------------------------------------------------

    def _load_output(self, conn: Connection, output_id: str) -> OutputRecord:
        row = conn.execute(select(outputs).where(outputs.c.id == output_id)).mappings().first()
        if row is None:
            raise UnknownOutputError(_unknown_output(output_id))
        return _output_record(row, self._media_refs(conn, [output_id]).get(output_id, {}))

    @staticmethod
    def _media_refs(conn: Connection, output_ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        refs: dict[str, dict[str, list[str]]] = {}
        if not output_ids:
            return refs
        rows = conn.execute(
            select(output_media.c.output_id, output_media.c.role, output_media.c.media_ref)
            .where(output_media.c.output_id.in_(list(output_ids)))
            .order_by(output_media.c.output_id, output_media.c.role, output_media.c.position)
        )
        for output_id, role, ref in rows:
            refs.setdefault(output_id, {}).setdefault(role, []).append(ref)
        return refs

    def _iter(self, query: Select, batch_size: int) -> Iterator[FeedbackRecord]:
        last_id = 0
        while True:
            with self.db.read() as conn:
                rows = conn.execute(
                    query.where(feedback.c.id > last_id).order_by(feedback.c.id).limit(batch_size)
                ).mappings().all()
                refs = self._media_refs(conn, sorted({row["output_id"] for row in rows}))
            for row in rows:
                yield _feedback_record(row, refs.get(row["output_id"], {}))
            if len(rows) < batch_size:
                return
            last_id = rows[-1]["f_id"]

    def _delete(self, work: Any) -> Deleted:
        trash: list[tuple[Path, str]] = []

        def attempt(conn: Connection) -> Deleted:
            return work(conn, trash)

        def undo() -> None:  # the transaction did not commit: put the files back
            for path, ref in reversed(trash):
                self.media.restore_from_trash(path, ref)
            trash.clear()

        result = self.db.run_write(attempt, on_rollback=undo)
        self.media.empty_trash([path for path, _ in trash])
        return result

    def _delete_output_rows(self, conn: Connection, output_id: str, trash: list[tuple[Path, str]]) -> Deleted:
        """Delete an output, its feedback and links, then each of its media that nothing else uses.

        Each media row is locked before its users are counted, so an output being recorded at the
        same moment with the same media either is counted, or finds the row gone and writes the
        file again (see :meth:`record_output`). Files are moved aside, and removed after commit.
        """
        refs = sorted(set(conn.execute(
            select(output_media.c.media_ref).where(output_media.c.output_id == output_id)).scalars()))
        feedback_ids = tuple(conn.execute(
            delete(feedback).where(feedback.c.output_id == output_id).returning(feedback.c.id)).scalars())
        conn.execute(delete(output_media).where(output_media.c.output_id == output_id))
        compared = select(comparisons.c.id).where(or_(comparisons.c.output_a == output_id,
                                                      comparisons.c.output_b == output_id))
        conn.execute(delete(comparison_votes).where(comparison_votes.c.comparison_id.in_(compared)))
        conn.execute(delete(comparisons).where(comparisons.c.id.in_(compared)))
        conn.execute(delete(outputs).where(outputs.c.id == output_id))
        removed: list[str] = []
        for ref in refs:
            if conn.execute(select(media.c.ref).where(media.c.ref == ref).with_for_update()).first() is None:
                continue
            if conn.execute(select(exists().where(output_media.c.media_ref == ref))).scalar():
                continue
            conn.execute(delete(media).where(media.c.ref == ref))
            moved = self.media.move_to_trash(ref)
            if moved is not None:
                trash.append((moved, ref))
            removed.append(ref)
        return Deleted(feedback_ids, (output_id,), tuple(removed))


# --- queries and rows ------------------------------------------------------------------------------


class _Statements:
    """The statements of the hot paths, built once (clicks come many per second under load)."""

    def __init__(self, is_sqlite: bool):
        insert = sqlite.insert if is_sqlite else postgresql.insert
        images = (select(func.count()).select_from(output_media)
                  .where(output_media.c.output_id == outputs.c.id, output_media.c.role == "output")
                  .scalar_subquery())
        # FOR SHARE: a concurrent delete of the output waits for this transaction (PostgreSQL)
        self.output_state = (select(outputs.c.task, outputs.c.expires_at, images)
                             .where(outputs.c.id == bindparam("id")).with_for_update(read=True, of=outputs))
        self.output_json = select(outputs.c.output).where(outputs.c.id == bindparam("id"))
        # bind names differ from column names (SQLAlchemy reserves those in INSERT / UPDATE)
        now = bindparam("b_now", type_=Timestamp)
        media_row = insert(media).values(ref=bindparam("b_ref"), kind=bindparam("b_kind"), size=bindparam("b_size"),
                                         created_at=now, last_used_at=now)
        # DO UPDATE, not DO NOTHING: it locks the row, so a concurrent delete of this media waits
        self.upsert_media = media_row.on_conflict_do_update(index_elements=["ref"], set_={"last_used_at": now})
        given = {name: bindparam(f"b_{name}", type_=feedback.c[name].type)
                 for name in ("thumbs", "correction", "comment")}
        output_id, annotator = bindparam("b_output_id"), bindparam("b_annotator")
        version = bindparam("b_app_version")
        self.insert_feedback = (
            insert(feedback)
            .values(output_id=output_id, annotator=annotator, **given, app_version=version,
                    created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=["output_id", "annotator"])
            .returning(feedback.c.id)
        )
        # a field left None keeps what an earlier save gave
        self.update_feedback = (
            update(feedback)
            .where(feedback.c.output_id == output_id, feedback.c.annotator == annotator)
            .values(**{name: func.coalesce(param, feedback.c[name]) for name, param in given.items()},
                    app_version=version, updated_at=now)
            .returning(feedback.c.id)
        )



def _voted_on(output_id: Any) -> Any:
    """Whether a vote was given on a comparison that shows the output (the vote keeps it, like feedback)."""
    return exists().where(comparison_votes.c.comparison_id == comparisons.c.id,
                          or_(comparisons.c.output_a == output_id, comparisons.c.output_b == output_id))


def _feedback_query() -> Select:
    return select(
        feedback.c.id.label("f_id"), feedback.c.annotator, feedback.c.thumbs, feedback.c.correction,
        feedback.c.comment, feedback.c.created_at.label("f_created_at"), feedback.c.updated_at,
        feedback.c.app_version.label("f_app_version"),
        *[c.label("output_id") if c.name == "id" else c for c in outputs.c
          if c.name not in ("app_version",)],
        outputs.c.app_version.label("o_app_version"),
    ).select_from(feedback.join(outputs))


def _filtered(query: Select, task: str | None, only: str, since: Any) -> Select:
    if task is not None:
        query = query.where(outputs.c.task == schema_for(task).task)
    if only not in ONLY_CHOICES:
        raise InvalidInputError(f"Unknown filter {only!r}; use one of {', '.join(ONLY_CHOICES)}.")
    if only == "corrected":
        query = query.where(feedback.c.correction.is_not(None))
    elif only == "approved":
        query = query.where(or_(feedback.c.correction.is_not(None), feedback.c.thumbs == 1))
    if since is not None:
        query = query.where(feedback.c.updated_at >= parse_since(since))
    return query


def _output_record(row: Mapping[str, Any], refs: Mapping[str, list[str]]) -> OutputRecord:
    output_id = row["output_id"] if "output_id" in row else row["id"]
    return OutputRecord(
        id=output_id,
        task=row["task"],
        model_id=row["model_id"],
        model_revision=row["model_revision"],
        backend=row["backend"],
        model_info=row["model_info"] or {},
        settings=row["settings"] or {},
        inputs=row["inputs"] or {},
        output=row["output"] or {},
        input_media=tuple(refs.get("input", ())),
        output_media=tuple(refs.get("output", ())),
        input_key=row["input_key"],
        session=row["session"],
        app_version=row["o_app_version"] if "o_app_version" in row else row["app_version"],
        created_at=_utc(row["created_at"]),
        expires_at=_utc(row["expires_at"]) if row["expires_at"] is not None else None,
    )


def _feedback_record(row: Mapping[str, Any], refs: Mapping[str, list[str]]) -> FeedbackRecord:
    return FeedbackRecord(
        id=int(row["f_id"]),
        annotator=row["annotator"],
        thumbs=row["thumbs"],
        correction=row["correction"],
        comment=row["comment"],
        created_at=_utc(row["f_created_at"]),
        updated_at=_utc(row["updated_at"]),
        app_version=row["f_app_version"],
        output=_output_record(row, refs),
    )


# --- small checks ----------------------------------------------------------------------------------


def parse_since(value: Any) -> datetime:
    """A date, datetime or ISO text (``2026-11-01``, ``2026-11-01T12:00``) as an aware UTC datetime."""
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            return parse_since(datetime.fromisoformat(value.strip()))
        except ValueError:
            pass
    raise InvalidInputError(f"{value!r} is not a date; use YYYY-MM-DD or an ISO date and time.")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _audit_deletion(conn: Connection, actor: str | None, action: str, target: str, deleted: Deleted) -> None:
    write_entry(conn, actor, action, target, {"feedback_ids": list(deleted.feedback_ids),
                                              "output_ids": list(deleted.output_ids),
                                              "media_files": len(deleted.media_refs)})


def _utc(value: datetime) -> datetime:
    """SQLite gives back naive datetimes (we store UTC); PostgreSQL aware ones in its time zone."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _short(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value)
    if len(text) > limit:
        raise InvalidInputError(f"The model field {text[:40]!r}... is longer than {limit} characters.")
    return text


def _unknown_output(output_id: str) -> str:
    return (f"Unknown output id {output_id!r}: no result with this id was recorded, or it was deleted. "
            "Use the output_id a task returned.")


def _check_output_id(output_id: Any) -> str:
    if not isinstance(output_id, str) or not _OUTPUT_ID.fullmatch(output_id.strip().lower()):
        raise UnknownOutputError(_unknown_output(str(output_id)[:80]))
    return output_id.strip().lower()


def _check_record_id(record_id: Any) -> int:
    if isinstance(record_id, bool) or not isinstance(record_id, int) or record_id <= 0:
        try:
            record_id = int(str(record_id).lstrip("#"))
        except ValueError:
            raise RecordNotFoundError(f"{record_id!r} is not a feedback record id (a number such as 123).") from None
    return record_id


def _require_admin(actor_role: str) -> None:
    if actor_role != ADMIN_ROLE:
        raise PermissionDeniedError("Only an admin can delete feedback records.")


__all__ = ["ADMIN_ROLE", "Deleted", "FeedbackStore", "ONLY_CHOICES", "Only", "parse_since"]
