"""Annotation mode: campaigns that feed batches of model outputs to several annotators.

>>> queue = AnnotationQueue(store)
>>> queue.create_campaign("captions-nov", "image-to-text", instructions="Fix the caption.", labels_per_item=2)
>>> queue.add_recorded("captions-nov", since="2026-11-01", without_feedback=True)   # outputs already recorded
>>> batch = queue.next_batch("captions-nov", "alice", 10)                          # leased to alice
>>> queue.submit("captions-nov", batch[0].output_id, "alice", correction="a grey cat on a sofa")
>>> queue.skip("captions-nov", batch[1].output_id, "alice")                        # back to the pool
>>> print(queue.progress("captions-nov").describe())

An *item* is a recorded output (see :meth:`FeedbackStore.record_output`); a label is an ordinary
feedback record (:meth:`FeedbackStore.add_feedback`), so ``mmdemo export`` takes annotations as it
takes any feedback. Items come from outputs already in the store (:meth:`AnnotationQueue.add_recorded`)
or from a folder of media a catalog model pre-labels (:meth:`AnnotationQueue.import_folder`), so that
annotators correct the model's suggestion rather than start from nothing.

Leases:

* :meth:`~AnnotationQueue.next_batch` gives an annotator the items they still hold plus new ones, up
  to ``n``, each *leased* to them until ``lease_seconds`` from now (asking again renews the lease).
  An item is given only while its labels (submitted) plus its live leases are fewer than the
  campaign's ``labels_per_item``: with the default of 1, two annotators never hold the same item.
* An annotator is never given an item twice (not one they submitted, skipped, or already gave
  feedback on elsewhere in the app).
* A lease that expires returns the item to the pool. A late submit still counts when the item has room
  for it; otherwise it is refused (:class:`NotLeasedError`) and nothing is saved.
* :meth:`~AnnotationQueue.submit` saves the feedback record and marks the item done in one
  transaction; :meth:`~AnnotationQueue.skip` gives the item back for others.

Concurrency: every grant (and every submit, which may need room on an item) locks the campaign row
first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite writes are serialized anyway), then counts
under that lock, so concurrent ``next_batch`` calls never lease an item beyond ``labels_per_item``.
A grant is one short transaction; the lock is held for milliseconds.

Outputs put in a campaign stop expiring (their ``expires_at`` is cleared), so they stay open for
feedback and are never purged as unrated while annotators work on them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from sqlalchemy import Connection, and_, bindparam, exists, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from ..errors import (
    AudioTooLongError,
    ImageTooLargeError,
    InvalidAudioError,
    InvalidImageError,
    InvalidInputError,
)
from ..inputs import check_characters
from .audit import record_after, write_entry
from .errors import (
    InvalidCampaignError,
    NotInCampaignError,
    NotLeasedError,
    UnknownCampaignError,
    UnknownOutputError,
)
from .records import FeedbackRecord, OutputRecord, SavedFeedback
from .schemas import clean_annotator, clean_comment, schema_for
from .store import FeedbackStore, _check_output_id, _feedback_query, _utc, parse_since
from .tables import Timestamp, annotation_assignments, annotation_campaigns, annotation_items, feedback, outputs

if TYPE_CHECKING:
    from ..registry import ModelRegistry

LEASED, DONE, SKIPPED = "leased", "done", "skipped"
DEFAULT_BATCH = 10
MAX_BATCH = 100
DEFAULT_LEASE_MINUTES = 30.0
MAX_LEASE_MINUTES = 7 * 24 * 60.0          # a week
MAX_LABELS_PER_ITEM = 20
MAX_INSTRUCTIONS_CHARS = 8000
IMPORT_SESSION = "annotation-import"     # the ``session`` of outputs made by an import
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".webm")

a = annotation_assignments
items = annotation_items
campaigns = annotation_campaigns


# --- what the queue hands back ---------------------------------------------------------------------


@dataclass(frozen=True)
class Campaign:
    """An annotation campaign; ``items`` is how many outputs it holds (when listed)."""

    id: int
    name: str
    task: str
    instructions: str
    labels_per_item: int
    lease_seconds: int
    model_id: str | None
    created_by: str | None
    created_at: datetime
    items: int = 0
    inputs: dict[str, Any] | None = None   # the task's other inputs for every item; an item's own override them
    item_order: str = "import"             # import, random, uncertain
    gold_share: float = 0.0                # share of gold items (with a reference answer) mixed into batches
    state: str = "open"                    # open, paused, closed, archived

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "task": self.task, "instructions": self.instructions,
                "labels_per_item": self.labels_per_item, "lease_minutes": self.lease_seconds / 60,
                "model_id": self.model_id, "created_by": self.created_by,
                "created_at": self.created_at.isoformat(), "items": self.items, "inputs": self.inputs,
                "order": self.item_order, "gold_share": self.gold_share, "state": self.state}


@dataclass(frozen=True)
class AnnotationItem:
    """One item of a batch: the recorded output (the model's suggestion and its inputs) and the lease."""

    campaign: str
    output: OutputRecord
    lease_expires_at: datetime

    @property
    def output_id(self) -> str:
        return self.output.id

    @property
    def task(self) -> str:
        return self.output.task


@dataclass(frozen=True)
class AnnotatorProgress:
    annotator: str
    done: int          # items submitted
    skipped: int
    leased: int        # items held now (live leases)
    last_done_at: datetime | None


@dataclass(frozen=True)
class CampaignProgress:
    """Where a campaign stands: labels done against labels wanted, per annotator, and agreement.

    ``agreement``: among items labelled by several annotators, the share on which all of them gave the
    same label (the same correction, or all accepted / all rejected the suggestion unchanged); None when
    no item has several labels yet.
    """

    campaign: Campaign
    items: int
    labels_done: int
    labels_wanted: int
    complete_items: int            # items with all the labels the campaign wants
    items_needing_labels: int      # items with fewer
    leased_items: int              # items someone holds now
    annotators: tuple[AnnotatorProgress, ...]
    multiply_labelled: int
    agreeing: int

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.multiply_labelled if self.multiply_labelled else None

    def describe(self) -> str:
        c = self.campaign
        lines = [f"{c.name} ({c.task}): {self.labels_done}/{self.labels_wanted} labels, "
                 f"{self.complete_items}/{self.items} items complete, {self.items_needing_labels} need more "
                 f"labels, {self.leased_items} held now ({c.labels_per_item} label"
                 f"{'s' if c.labels_per_item > 1 else ''} per item)"]
        if self.agreement is not None:
            lines.append(f"agreement: {self.agreeing}/{self.multiply_labelled} items with several labels agree "
                         f"({self.agreement:.0%})")
        for who in self.annotators:
            lines.append(f"  {who.annotator}: {who.done} done, {who.skipped} skipped, {who.leased} held")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign.to_dict(), "items": self.items, "labels_done": self.labels_done,
                "labels_wanted": self.labels_wanted, "complete_items": self.complete_items,
                "items_needing_labels": self.items_needing_labels, "leased_items": self.leased_items,
                "multiply_labelled": self.multiply_labelled, "agreeing": self.agreeing,
                "agreement": self.agreement,
                "annotators": [{"annotator": w.annotator, "done": w.done, "skipped": w.skipped, "leased": w.leased,
                                "last_done_at": w.last_done_at.isoformat() if w.last_done_at else None}
                               for w in self.annotators]}


@dataclass
class ImportSummary:
    """What :meth:`AnnotationQueue.import_folder` did."""

    campaign: str
    model_id: str | None
    added: int = 0
    output_ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file name, why)

    def describe(self) -> str:
        lines = [f"{self.added} item(s) pre-labelled by {self.model_id or 'the default model'} and added to "
                 f"{self.campaign}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# --- the queue -------------------------------------------------------------------------------------


CampaignRef = str | int | Campaign  # a campaign by name, id, or as returned


class AnnotationQueue:
    """Campaigns, items and leases over a :class:`FeedbackStore` (same database, same transactions).

    ``clock``: returns the current time (aware, UTC); tests pass one to expire leases without waiting.
    """

    def __init__(self, store: FeedbackStore, *, clock: Callable[[], datetime] | None = None):
        self.store = store
        self.db = store.db
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        insert = sqlite.insert if self.db.is_sqlite else postgresql.insert
        lease = {"state": LEASED, "leased_at": bindparam("b_now", type_=Timestamp),
                 "expires_at": bindparam("b_until", type_=Timestamp), "done_at": None}
        self._lease = (insert(a).values(item_id=bindparam("b_item"), annotator=bindparam("b_annotator"), **lease)
                       .on_conflict_do_update(index_elements=["item_id", "annotator"], set_=lease))

    # -- campaigns --

    def create_campaign(
        self,
        name: str,
        task: str,
        *,
        instructions: str = "",
        labels_per_item: int = 1,
        model: str | None = None,
        lease_minutes: float = DEFAULT_LEASE_MINUTES,
        created_by: str | None = None,
    ) -> Campaign:
        """Create a campaign (empty: add items with :meth:`add_recorded`, :meth:`add_outputs` or
        :meth:`import_folder`). ``model``: the catalog model that pre-labels imported media.
        Raises :class:`InvalidCampaignError` for a bad field or a name already taken."""
        name = _clean_name(name)
        task = schema_for(task).task
        if not isinstance(instructions, str) or len(instructions) > MAX_INSTRUCTIONS_CHARS:
            raise InvalidCampaignError(f"The instructions must be text of at most {MAX_INSTRUCTIONS_CHARS} characters.")
        check_characters(instructions, "instructions", InvalidCampaignError)
        if isinstance(labels_per_item, bool) or not isinstance(labels_per_item, int) \
                or not 1 <= labels_per_item <= MAX_LABELS_PER_ITEM:
            raise InvalidCampaignError(
                f"Labels per item must be a whole number from 1 to {MAX_LABELS_PER_ITEM}, not {labels_per_item!r}.")
        if isinstance(lease_minutes, bool) or not isinstance(lease_minutes, (int, float)) \
                or not 0 < lease_minutes <= MAX_LEASE_MINUTES:
            raise InvalidCampaignError(
                f"The lease must last more than 0 and at most {MAX_LEASE_MINUTES:.0f} minutes, not {lease_minutes!r}.")
        if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 300):
            raise InvalidCampaignError("The model must be a catalog model id.")
        row = {"name": name, "task": task, "instructions": instructions.strip(), "labels_per_item": labels_per_item,
               "lease_seconds": max(1, round(lease_minutes * 60)), "model_id": model.strip() if model else None,
               "created_by": clean_annotator(created_by) if created_by else None, "created_at": self.clock()}

        def work(conn: Connection) -> Campaign:
            if conn.execute(select(campaigns.c.id).where(campaigns.c.name == name)).first() is not None:
                raise InvalidCampaignError(f"There is already a campaign named {name!r}; choose another name.")
            new_id = conn.execute(campaigns.insert().values(**row).returning(campaigns.c.id)).scalar_one()
            write_entry(conn, row["created_by"], "annotate_create", name,
                        {"campaign_id": int(new_id), "task": task, "model": row["model_id"]})
            return Campaign(id=int(new_id), **row)

        try:
            return self.db.run_write(work)
        except Exception as exc:
            if isinstance(exc.__cause__, IntegrityError):  # created by someone else at this very moment
                raise InvalidCampaignError(f"There is already a campaign named {name!r}; choose another name.") from exc
            raise

    def campaign(self, ref: CampaignRef) -> Campaign:
        """A campaign by name or id, with its item count; :class:`UnknownCampaignError` if none."""
        with self.db.read() as conn:
            found = self._campaign(conn, ref)
            count = conn.execute(select(func.count()).select_from(items)
                                 .where(items.c.campaign_id == found.id)).scalar_one()
        return _replace(found, items=int(count))

    def campaigns(self, task: str | None = None) -> list[Campaign]:
        """All campaigns (of ``task``), newest first, with their item counts."""
        count = (select(func.count()).select_from(items).where(items.c.campaign_id == campaigns.c.id)
                 .scalar_subquery())
        query = select(campaigns, count.label("items")).order_by(campaigns.c.id.desc())
        if task is not None:
            query = query.where(campaigns.c.task == schema_for(task).task)
        with self.db.read() as conn:
            return [_campaign_of(row) for row in conn.execute(query).mappings()]

    # -- items --

    def add_outputs(self, ref: CampaignRef, output_ids: Iterable[str]) -> int:
        """Add recorded outputs to a campaign; returns how many were new to it. Every id must be an
        output of the campaign's task (:class:`UnknownOutputError`, :class:`NotInCampaignError`)."""
        ids = list(dict.fromkeys(_check_output_id(output_id) for output_id in output_ids))
        if not ids:
            return 0

        def work(conn: Connection) -> int:
            camp = self._campaign(conn, ref, lock=True)
            found = dict(conn.execute(select(outputs.c.id, outputs.c.task).where(outputs.c.id.in_(ids))).all())
            missing = [i for i in ids if i not in found]
            if missing:
                raise UnknownOutputError(f"Unknown output id(s): {', '.join(missing[:5])}"
                                         + (" ..." if len(missing) > 5 else ""))
            wrong = [i for i in ids if found[i] != camp.task]
            if wrong:
                raise NotInCampaignError(f"Output {wrong[0]} is {found[wrong[0]]}, not {camp.task} as campaign "
                                         f"{camp.name!r}.")
            there = set(conn.execute(select(items.c.output_id).where(items.c.campaign_id == camp.id,
                                                                     items.c.output_id.in_(ids))).scalars())
            fresh = [i for i in ids if i not in there]
            if fresh:  # in the order given: batches follow it
                now = self.clock()
                conn.execute(items.insert(), [{"campaign_id": camp.id, "output_id": i, "added_at": now} for i in fresh])
                conn.execute(update(outputs).where(outputs.c.id.in_(fresh)).values(expires_at=None))
            return len(fresh)

        return self.db.run_write(work)

    def add_recorded(
        self,
        ref: CampaignRef,
        *,
        model: str | None = None,
        since: Any = None,
        without_feedback: bool = True,
        limit: int | None = None,
        actor: str | None = None,
    ) -> int:
        """Add the outputs already recorded for the campaign's task, oldest first; returns how many.

        ``model``: only this model's outputs. ``since``: only outputs recorded at or after this date.
        ``without_feedback``: only outputs nobody has rated yet (default). Outputs whose feedback window
        has closed are left out (they are about to be purged); ``limit``: at most this many. The audit log
        records it (by ``actor``) in the same transaction."""
        since_time = parse_since(since) if since is not None else None
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidInputError(f"The limit must be a positive whole number, not {limit!r}.")

        def work(conn: Connection) -> int:
            camp = self._campaign(conn, ref, lock=True)
            now = self.clock()
            where = [outputs.c.task == camp.task,
                     or_(outputs.c.expires_at.is_(None), outputs.c.expires_at > now)]
            if model:
                where.append(outputs.c.model_id == model)
            if since_time is not None:
                where.append(outputs.c.created_at >= since_time)
            if without_feedback:
                where.append(~exists().where(feedback.c.output_id == outputs.c.id))
            added = self._insert_items(conn, camp, and_(*where), order=(outputs.c.created_at, outputs.c.id),
                                       limit=limit)
            write_entry(conn, actor, "annotate_add", camp.name, {"campaign_id": camp.id, "added": added})
            return added

        return self.db.run_write(work)

    def import_folder(
        self,
        ref: CampaignRef,
        folder: Path,
        registry: "ModelRegistry",
        *,
        model: str | None = None,
        inputs: dict[str, Any] | None = None,
        session: str = IMPORT_SESSION,
        progress: Callable[[int, int, str], None] | None = None,
        actor: str | None = None,
    ) -> ImportSummary:
        """Pre-label every image (or audio file) of ``folder`` with a catalog model and add the results.

        Each file runs through :func:`mmdemo.tasks.predict` as in the app and is recorded with
        :meth:`FeedbackStore.record_prediction`. ``model``: the catalog model (default: the campaign's, then
        the task's first). ``inputs``: the task's other inputs, the same for every file (``question``
        for VQA, ``labels`` for zero-shot, ``prefix``, ``language``...). A file the task refuses (not
        an image, too large...) is skipped and listed in the summary; a model failure stops the import
        after adding what was done. The audit log records what was added (by ``actor``).
        """
        from .. import tasks  # the task layer (torch) only when an import runs

        camp = self.campaign(ref)
        schema = schema_for(camp.task)
        if schema.media_input is None:
            raise InvalidCampaignError(f"{camp.task} has no input media to import; add its recorded outputs "
                                       "instead (mmdemo annotate add).")
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidInputError(f"{folder} is not a folder.")
        suffixes = AUDIO_SUFFIXES if schema.media_input == "audio" else IMAGE_SUFFIXES
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise InvalidInputError(f"{folder} holds no {schema.media_input} files ({', '.join(suffixes)}).")
        model_id = model or camp.model_id
        summary = ImportSummary(camp.name, model_id)
        extra = {k: v for k, v in (inputs or {}).items() if v is not None}
        try:
            for index, path in enumerate(files):
                if progress is not None:
                    progress(index, len(files), path.name)
                request = {schema.media_input: path, **extra}
                try:
                    prediction = tasks.predict(registry, camp.task, model_id, request,
                                               record=lambda p: self.store.record_prediction(p, session=session))
                except (InvalidImageError, ImageTooLargeError, InvalidAudioError, AudioTooLongError) as exc:
                    summary.skipped.append((path.name, str(exc)))
                    continue
                summary.model_id = summary.model_id or prediction.model.id
                summary.output_ids.append(prediction.output_id)
        finally:
            if summary.output_ids:
                summary.added = self.add_outputs(camp.id, summary.output_ids)
                record_after(self.store, actor, "annotate_import", camp.name,
                             {"campaign_id": camp.id, "model": summary.model_id, "added": summary.added,
                              "skipped": len(summary.skipped)})
        return summary

    # -- annotating --

    def next_batch(self, ref: CampaignRef, annotator: str, n: int = DEFAULT_BATCH) -> list[AnnotationItem]:
        """The annotator's batch: the items they hold, then new ones, up to ``n``; every lease runs for
        the campaign's lease time from now. Empty when nothing is left for them."""
        annotator = clean_annotator(annotator)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
            raise InvalidInputError(f"A batch is 1 to {MAX_BATCH} items, not {n!r}.")

        def work(conn: Connection) -> list[AnnotationItem]:
            # 1. the campaign row lock: grants of one campaign run one at a time, and what the counts
            #    below see (READ COMMITTED: each statement's own snapshot) includes every earlier grant
            camp = self._campaign(conn, ref, lock=True)
            now = self.clock()
            until = now + timedelta(seconds=camp.lease_seconds)
            # 2. what the annotator holds already
            held = list(conn.execute(
                select(a.c.item_id).join(items, items.c.id == a.c.item_id)
                .where(items.c.campaign_id == camp.id, a.c.annotator == annotator, a.c.state == LEASED,
                       a.c.expires_at > now)
                .order_by(a.c.item_id)).scalars())
            # 3. new items: not had by them, not rated by them, with room for another label
            new: list[int] = []
            if len(held) < n:
                taken = (select(func.count()).select_from(a)
                         .where(a.c.item_id == items.c.id, _counts(now)).scalar_subquery())
                theirs = exists().where(a.c.item_id == items.c.id, a.c.annotator == annotator,
                                        or_(a.c.state != LEASED, a.c.expires_at > now))
                rated = exists().where(feedback.c.output_id == items.c.output_id, feedback.c.annotator == annotator)
                new = list(conn.execute(
                    select(items.c.id)
                    .where(items.c.campaign_id == camp.id, ~theirs, ~rated, taken < camp.labels_per_item)
                    .order_by(items.c.id).limit(n - len(held))).scalars())
            # 4. lease (or renew) them all
            chosen = [*held, *new]
            if not chosen:
                return []
            conn.execute(self._lease, [{"b_item": item, "b_annotator": annotator, "b_now": now, "b_until": until}
                                       for item in chosen])
            rows = conn.execute(select(items.c.id, items.c.output_id).where(items.c.id.in_(chosen))
                                .order_by(items.c.id)).all()
            return [AnnotationItem(camp.name, self.store._load_output(conn, output_id), until)
                    for _, output_id in rows]

        return self.db.run_write(work)

    def submit(
        self,
        ref: CampaignRef,
        output_id: str,
        annotator: str,
        *,
        thumbs: int | None = None,
        correction: Any = None,
        comment: str | None = None,
    ) -> SavedFeedback:
        """Save the annotator's label on an item of their batch as a feedback record and mark it done,
        in one transaction. Nothing given (no thumbs, correction or comment) means the suggestion is
        right: a thumbs up. Submitting again updates the same record.

        Raises :class:`NotLeasedError` when the item is not theirs (never given, skipped, or given to
        someone else after their lease expired), :class:`NotInCampaignError`, and the store's
        :class:`InvalidFeedbackError` for a bad correction."""
        annotator = clean_annotator(annotator)
        camp = self.campaign(ref)
        output_id = _check_output_id(output_id)
        if thumbs is None and correction is None and clean_comment(comment) is None:
            thumbs = 1  # accepted as suggested

        def mark_done(conn: Connection, saved: SavedFeedback) -> None:
            self._campaign(conn, camp.id, lock=True)
            now = self.clock()
            item_id = self._item_id(conn, camp, output_id)
            row = conn.execute(select(a.c.state, a.c.expires_at)
                               .where(a.c.item_id == item_id, a.c.annotator == annotator)).first()
            if row is None or row.state == SKIPPED:
                raise NotLeasedError(_not_in_batch(output_id, annotator, skipped=row is not None))
            if row.state == LEASED and _utc(row.expires_at) <= now:
                others = conn.execute(select(func.count()).select_from(a).where(
                    a.c.item_id == item_id, a.c.annotator != annotator, _counts(now))).scalar_one()
                if others >= camp.labels_per_item:
                    raise NotLeasedError(f"Your lease on item {output_id} expired and it was given to someone "
                                         "else; nothing was saved. Get a new batch.")
            conn.execute(update(a).where(a.c.item_id == item_id, a.c.annotator == annotator)
                         .values(state=DONE, expires_at=None, done_at=now))

        return self.store.add_feedback(output_id, annotator=annotator, thumbs=thumbs, correction=correction,
                                       comment=comment, on_saved=mark_done)

    def skip(self, ref: CampaignRef, output_id: str, annotator: str) -> None:
        """Give an item of the annotator's batch back: others may take it; they will not get it again."""
        annotator = clean_annotator(annotator)
        output_id = _check_output_id(output_id)

        def work(conn: Connection) -> None:
            camp = self._campaign(conn, ref)
            item_id = self._item_id(conn, camp, output_id)
            state = conn.execute(select(a.c.state).where(a.c.item_id == item_id, a.c.annotator == annotator)).scalar()
            if state == DONE:
                raise NotLeasedError(f"You already submitted item {output_id}; it cannot be skipped.")
            if state != LEASED:
                raise NotLeasedError(_not_in_batch(output_id, annotator, skipped=state == SKIPPED))
            conn.execute(update(a).where(a.c.item_id == item_id, a.c.annotator == annotator)
                         .values(state=SKIPPED, expires_at=None, done_at=self.clock()))

        self.db.run_write(work)

    def release(self, ref: CampaignRef, annotator: str) -> int:
        """Give back every item the annotator holds in the campaign (they may get them again later);
        returns how many."""
        annotator = clean_annotator(annotator)

        def work(conn: Connection) -> int:
            camp = self._campaign(conn, ref)
            mine = select(items.c.id).where(items.c.campaign_id == camp.id)
            return len(conn.execute(a.delete().where(a.c.annotator == annotator, a.c.state == LEASED,
                                                     a.c.item_id.in_(mine)).returning(a.c.item_id)).all())

        return self.db.run_write(work)

    def labels(self, ref: CampaignRef) -> list[FeedbackRecord]:
        """The labels submitted in the campaign (one feedback record per item and annotator who
        submitted it), in record order: what ``mmdemo evaluate --campaign`` scores models against."""
        with self.db.read() as conn:
            camp = self._campaign(conn, ref)
        submitted = exists().where(items.c.campaign_id == camp.id, items.c.output_id == feedback.c.output_id,
                                   a.c.item_id == items.c.id, a.c.annotator == feedback.c.annotator,
                                   a.c.state == DONE)
        return list(self.store._iter(_feedback_query().where(submitted), 500))

    # -- progress --

    def progress(self, ref: CampaignRef) -> CampaignProgress:
        """Labels done and wanted, items complete or needing labels, per annotator, and agreement."""
        with self.db.read() as conn:
            camp = self._campaign(conn, ref)
            now = self.clock()
            total = int(conn.execute(select(func.count()).select_from(items)
                                     .where(items.c.campaign_id == camp.id)).scalar_one())
            rows = conn.execute(
                select(a.c.item_id, a.c.annotator, a.c.state, a.c.expires_at, a.c.done_at)
                .join(items, items.c.id == a.c.item_id).where(items.c.campaign_id == camp.id)).all()
            labels = conn.execute(
                select(items.c.id, feedback.c.thumbs, feedback.c.correction)
                .select_from(a.join(items, items.c.id == a.c.item_id)
                             .join(feedback, and_(feedback.c.output_id == items.c.output_id,
                                                  feedback.c.annotator == a.c.annotator)))
                .where(items.c.campaign_id == camp.id, a.c.state == DONE)).all()
        done_per_item: dict[int, int] = {}
        leased_items: set[int] = set()
        people: dict[str, dict[str, Any]] = {}
        for item_id, annotator, state, expires_at, done_at in rows:
            who = people.setdefault(annotator, {DONE: 0, SKIPPED: 0, LEASED: 0, "last": None})
            if state == LEASED:
                if _utc(expires_at) > now:
                    who[LEASED] += 1
                    leased_items.add(item_id)
                continue
            who[state] += 1
            if state == DONE:
                done_per_item[item_id] = done_per_item.get(item_id, 0) + 1
                done = _utc(done_at) if done_at else None
                if done and (who["last"] is None or done > who["last"]):
                    who["last"] = done
        keys: dict[int, set[str]] = {}
        counts: dict[int, int] = {}
        for item_id, thumbs, correction in labels:
            keys.setdefault(item_id, set()).add(_label_key(thumbs, correction))
            counts[item_id] = counts.get(item_id, 0) + 1
        several = [item_id for item_id, count in counts.items() if count > 1]
        lpi = camp.labels_per_item
        complete = sum(1 for count in done_per_item.values() if count >= lpi)
        return CampaignProgress(
            campaign=_replace(camp, items=total),
            items=total,
            labels_done=sum(min(count, lpi) for count in done_per_item.values()),
            labels_wanted=total * lpi,
            complete_items=complete,
            items_needing_labels=total - complete,
            leased_items=len(leased_items),
            annotators=tuple(AnnotatorProgress(name, w[DONE], w[SKIPPED], w[LEASED], w["last"])
                             for name, w in sorted(people.items())),
            multiply_labelled=len(several),
            agreeing=sum(1 for item_id in several if len(keys[item_id]) == 1),
        )

    # -- internals --

    def _campaign(self, conn: Connection, ref: CampaignRef, lock: bool = False) -> Campaign:
        if isinstance(ref, Campaign):
            where = campaigns.c.id == ref.id
        elif isinstance(ref, int) and not isinstance(ref, bool):
            where = campaigns.c.id == ref
        elif isinstance(ref, str) and ref.strip().isdigit():
            where = campaigns.c.id == int(ref)
        elif isinstance(ref, str) and ref.strip():
            where = campaigns.c.name == ref.strip()
        else:
            raise UnknownCampaignError(f"{ref!r} is not a campaign name.")
        query = select(campaigns).where(where)
        row = conn.execute(query.with_for_update() if lock else query).mappings().first()
        if row is None:
            raise UnknownCampaignError(f"There is no annotation campaign {getattr(ref, 'name', ref)!r} "
                                       "(mmdemo annotate list shows them).")
        return _campaign_of(row)

    @staticmethod
    def _item_id(conn: Connection, camp: Campaign, output_id: str) -> int:
        item_id = conn.execute(select(items.c.id).where(items.c.campaign_id == camp.id,
                                                        items.c.output_id == output_id)).scalar()
        if item_id is None:
            raise NotInCampaignError(f"Output {output_id} is not an item of campaign {camp.name!r}.")
        return int(item_id)

    def _insert_items(self, conn: Connection, camp: Campaign, where: Any, order: Sequence[Any] | None,
                      limit: int | None) -> int:
        """Add the outputs matching ``where`` that the campaign lacks (caller holds the campaign lock),
        and keep them open for feedback for as long as they are items."""
        now = self.clock()
        fresh = (select(literal(camp.id), outputs.c.id, bindparam("b_added", now, type_=Timestamp))
                 .where(where, ~exists().where(items.c.campaign_id == camp.id, items.c.output_id == outputs.c.id)))
        if order is not None:
            fresh = fresh.order_by(*order)
        if limit is not None:
            fresh = fresh.limit(limit)
        added = len(conn.execute(items.insert().from_select(["campaign_id", "output_id", "added_at"], fresh)
                                 .returning(items.c.id)).all())
        mine = select(items.c.output_id).where(items.c.campaign_id == camp.id)
        conn.execute(update(outputs).where(outputs.c.id.in_(mine), outputs.c.expires_at.is_not(None))
                     .values(expires_at=None))
        return int(added)


# --- helpers ---------------------------------------------------------------------------------------


def _counts(now: datetime) -> Any:
    """An assignment that takes one of an item's places: a label, or a live lease."""
    return or_(a.c.state == DONE, and_(a.c.state == LEASED, a.c.expires_at > now))


def _label_key(thumbs: int | None, correction: Any) -> str:
    """What two labels must share to agree: the correction (text compared without case and extra
    spaces, labels as a set), else whether the suggestion was accepted or rejected."""
    if correction is None:
        return "rejected" if thumbs == -1 else "accepted"
    if isinstance(correction, str):
        return "text:" + " ".join(correction.lower().split())
    if isinstance(correction, list):
        return "labels:" + json.dumps(sorted(" ".join(str(x).lower().split()) for x in correction))
    return "json:" + json.dumps(correction, sort_keys=True)


_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


def _clean_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name.strip() or "\x00"):
        raise InvalidCampaignError("A campaign needs a name: 1 to 200 printable characters.")
    name = check_characters(name.strip(), "campaign name", InvalidCampaignError)
    if name.isdigit():
        raise InvalidCampaignError("A campaign name cannot be only digits (ids are).")
    return name


def _campaign_of(row: Any) -> Campaign:
    return Campaign(id=int(row["id"]), name=row["name"], task=row["task"], instructions=row["instructions"],
                    labels_per_item=int(row["labels_per_item"]), lease_seconds=int(row["lease_seconds"]),
                    model_id=row["model_id"], created_by=row["created_by"], created_at=_utc(row["created_at"]),
                    items=int(row.get("items") or 0), inputs=row.get("inputs"),
                    item_order=row.get("item_order") or "import", gold_share=float(row.get("gold_share") or 0.0),
                    state=row.get("state") or "open")


def _replace(camp: Campaign, **changes: Any) -> Campaign:
    from dataclasses import replace

    return replace(camp, **changes)


def _not_in_batch(output_id: str, annotator: str, *, skipped: bool) -> str:
    if skipped:
        return f"You skipped item {output_id}; it is no longer in your batch."
    return f"Item {output_id} is not in {annotator}'s batch; get a batch first."


__all__ = ["AnnotationItem", "AnnotationQueue", "AnnotatorProgress", "Campaign", "CampaignProgress",
           "DEFAULT_BATCH", "ImportSummary"]
