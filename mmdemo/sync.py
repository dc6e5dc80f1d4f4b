"""Keep a Space's labels across restarts: sync the feedback store to a private Hub dataset repo on a schedule,
restore it from there at start.

    MMDEMO_SYNC_REPO=me/mmdemo-labels MMDEMO_SYNC_EVERY_MINUTES=5 HF_TOKEN=... mmdemo serve

Every ``sync_every_minutes`` (and at graceful shutdown) :class:`HubSync` takes a consistent snapshot of the
store with :func:`~mmdemo.feedback.backup.backup_store` into ``<data_dir>/.hub-sync/`` (one snapshot kept)
and pushes it to the repo in **one** commit: the new snapshot, ``LATEST``, the media files the repo does
not hold yet, and the deletion of what is gone locally (the previous snapshot, media of deleted outputs).
A commit that deletes anything is followed by ``super_squash_history``: a superseded snapshot's database
still holds the records deleted since (data-subject requests, expired outputs), and deleted media stay in
old commits otherwise; squashing also keeps the repo at one snapshot's size. A store unchanged since the
last push (its snapshot's database the same bytes, no media added or deleted) makes no commit.

Why not huggingface_hub's ``CommitScheduler``: its ``push_to_hub`` uploads files whose mtime changed and
never deletes (so deleted media and old snapshots would stay in the repo), it creates the repo in its
constructor (a Hub out of reach at start would crash the app) and pushes again from ``atexit``. A timer
thread calling ``create_commit`` with explicit add and delete operations does what is needed here.

At start, when the local store is empty, the repo's newest snapshot and its media are downloaded and
restored (:meth:`HubSync.restore_at_start`) before the store opens. A repo without a snapshot is a first
start. A repo that cannot be read leaves the app running on an empty store, and syncing is held back (a
sync would replace the repo's snapshot with the empty store) until the repo can be read and holds no
snapshot; ``/readyz`` says why. One app (one replica) per repo.

Recovery point: what was recorded after the last sync is lost on a crash (up to ``sync_every_minutes``).
The Models panel shows the last sync. Tested through a local stand-in for ``HfApi`` (tests/hub_standin.py),
not against the Hub itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import func, select

from .config import Settings
from .feedback.backup import (
    LATEST, MANIFEST, MEDIA, PG_DUMP_FILE, SNAPSHOTS, SQLITE_FILE, RestoreResult, backup_store, list_snapshots,
    restore_store,
)
from .feedback.database import Database, sqlite_url
from .feedback.tables import feedback, outputs

if TYPE_CHECKING:
    from .feedback import FeedbackStore

log = logging.getLogger(__name__)

SYNC_FOLDER = ".hub-sync"  # under the data dir: the local copy of what the repo holds
REPO_TYPE = "dataset"
_SYNCED_PREFIXES = (f"{SNAPSHOTS}/", f"{MEDIA}/")  # what a sync may delete in the repo (never .gitattributes...)


class HubSync:
    """Syncs the store of ``settings`` (``store()`` returns it, opened) to ``settings.sync_repo``.

    ``api``: an ``HfApi`` (default: a new one, with ``HF_TOKEN``), or a stand-in with the same methods
    (``create_repo``, ``create_commit``, ``list_repo_files``, ``hf_hub_download``, ``super_squash_history``).
    """

    def __init__(self, settings: Settings, store: Callable[[], "FeedbackStore"], api: Any = None) -> None:
        if not settings.sync_repo:
            raise ValueError("HubSync needs settings.sync_repo (MMDEMO_SYNC_REPO).")
        self.settings = settings
        self.repo_id = settings.sync_repo
        self.folder = settings.data_dir / SYNC_FOLDER
        self._store = store
        self._api = api
        self._lock = threading.Lock()  # one sync at a time
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote: set[str] | None = None  # the repo's files after our last commit (None: ask the repo)
        self._repo_created = False
        self._squash_pending = False
        self._pushed_digest: str | None = None  # of the database file of the snapshot last pushed
        self.held_back: str | None = None  # why syncing is held back (the repo's data was not restored)
        self.last_sync_at: float | None = None  # time.time() of the last successful sync
        self.last_error: str | None = None

    @property
    def api(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi  # imported late: it reads HF_HUB_OFFLINE and the token at import

            self._api = HfApi()
        return self._api

    # -- start: restore --

    def restore_at_start(self) -> RestoreResult | None:
        """Before the app opens its store: when the local store is empty, restore the repo's newest snapshot
        into it. Never raises: a repo out of reach is logged, and syncing is held back (see the module)."""
        try:
            if not local_store_is_empty(self.settings):
                log.info("hub sync: the local store holds records; nothing is restored from %s", self.repo_id)
                return None
        except Exception as exc:  # noqa: BLE001 - the store's own check at open says what is wrong
            log.warning("hub sync: could not tell whether the local store is empty (%s); nothing restored", exc)
            return None
        try:
            snapshot = self._remote_snapshot()
        except Exception as exc:  # noqa: BLE001 - network, token, server: all leave the app starting
            self._hold_back(f"the repo {self.repo_id} could not be read at start ({_short(exc)})")
            return None
        if snapshot is None:
            log.info("hub sync: %s holds no snapshot yet (first start); the first sync creates one", self.repo_id)
            return None
        try:
            self._download(snapshot)
            result = restore_store(self.folder, self.settings.data_dir, database_url(self.settings),
                                   snapshot=snapshot)
        except Exception as exc:  # noqa: BLE001
            self._hold_back(f"restoring snapshot {snapshot} of {self.repo_id} failed ({_short(exc)})")
            return None
        log.warning("hub sync: %s", result.describe())
        return result

    def _hold_back(self, why: str) -> None:
        self.held_back = (f"{why}; the app started with an empty store and does not sync until the repo can be "
                          "read and holds no snapshot (restart the app to restore it)")
        self.last_error = why
        log.error("hub sync: %s", self.held_back)

    def _remote_snapshot(self) -> str | None:
        """The newest complete snapshot in the repo (None: none, or no repo yet); remembers its files."""
        from huggingface_hub.errors import RepositoryNotFoundError  # imported late: see config.apply_environment

        try:
            files = set(self.api.list_repo_files(self.repo_id, repo_type=REPO_TYPE))
        except RepositoryNotFoundError:
            self._remote = set()
            return None
        self._remote = files
        complete = sorted(path.split("/")[1] for path in files
                          if path.startswith(f"{SNAPSHOTS}/") and path.endswith(f"/{MANIFEST}"))
        if not complete:
            return None
        if LATEST in files:
            latest = Path(self.api.hf_hub_download(self.repo_id, LATEST, repo_type=REPO_TYPE,
                                                   local_dir=self.folder)).read_text(encoding="utf-8").strip()
            if latest in complete:
                return latest
        return complete[-1]

    def _download(self, snapshot: str) -> None:
        """The snapshot's files and the media its manifest names (those not already in the sync folder)."""
        assert self._remote is not None
        for path in sorted(self._remote):
            if path.startswith(f"{SNAPSHOTS}/{snapshot}/"):
                self.api.hf_hub_download(self.repo_id, path, repo_type=REPO_TYPE, local_dir=self.folder)
        manifest = json.loads((self.folder / SNAPSHOTS / snapshot / MANIFEST).read_text(encoding="utf-8"))
        for ref in manifest["media"]:
            path = f"{MEDIA}/{ref[:2]}/{ref}"
            if not (self.folder / path).is_file():
                self.api.hf_hub_download(self.repo_id, path, repo_type=REPO_TYPE, local_dir=self.folder)

    # -- syncing --

    def start(self) -> None:
        """Sync every ``settings.sync_every_minutes`` in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mmdemo-hub-sync", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the schedule (a sync under way finishes); :meth:`sync_now` still works."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.wait(self.settings.sync_every_minutes * 60):
            self.sync_now()

    def sync_now(self) -> bool:
        """Snapshot the store and push it to the repo now (at shutdown, or on schedule). True when the repo
        holds the store as it was at the start of this call; never raises (failures are logged and kept in
        :attr:`last_error`)."""
        with self._lock:
            try:
                if self.held_back and not self._repo_may_be_replaced():
                    log.error("hub sync: not synced: %s", self.held_back)
                    return False
                return self._sync()
            except Exception as exc:  # noqa: BLE001 - the next sync tries again
                self._remote = None
                self.last_error = _short(exc)
                log.error("hub sync to %s failed (the next one tries again): %s", self.repo_id, self.last_error)
                return False

    def _repo_may_be_replaced(self) -> bool:
        """After a failed start: the repo can be read now and holds no snapshot (nothing to overwrite)."""
        if self._remote_snapshot() is not None:
            return False
        log.warning("hub sync: %s can be read and holds no snapshot: syncing resumes", self.repo_id)
        self.held_back = None
        return True

    def _sync(self) -> bool:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        if not self._repo_created:
            self.api.create_repo(self.repo_id, repo_type=REPO_TYPE, private=True, exist_ok=True)
            self._repo_created = True
        if self._remote is None:
            self._remote = set(self.api.list_repo_files(self.repo_id, repo_type=REPO_TYPE))
        result = backup_store(self._store(), self.folder, keep=1)
        digest = database_digest(self.folder / SNAPSHOTS / result.snapshot)
        local = synced_files(self.folder)
        added = sorted((local - self._remote) | {LATEST})
        deleted = sorted(path for path in self._remote - local if path.startswith(_SYNCED_PREFIXES))
        media_changed = any(path.startswith(f"{MEDIA}/") for path in [*added, *deleted])
        if digest == self._pushed_digest and not media_changed and not self._squash_pending:
            self._synced()  # the repo's snapshot holds the same database: nothing to commit
            return True
        operations = ([CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(self.folder / path)) for path in added]
                      + [CommitOperationDelete(path_in_repo=path) for path in deleted])
        media_added = sum(path.startswith(f"{MEDIA}/") for path in added)
        media_deleted = sum(path.startswith(f"{MEDIA}/") for path in deleted)
        message = (f"mmdemo sync: snapshot {result.snapshot} ({result.rows.get('outputs', 0)} outputs, "
                   f"{result.rows.get('feedback', 0)} feedback records; {media_added} media files added, "
                   f"{media_deleted} deleted)")
        self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type=REPO_TYPE)
        self._remote = (self._remote - set(deleted)) | set(added)
        self._pushed_digest = digest
        if deleted or self._squash_pending:
            self._squash_pending = True
            self.api.super_squash_history(self.repo_id, repo_type=REPO_TYPE,
                                          commit_message=f"mmdemo sync: snapshot {result.snapshot} (history squashed)")
            self._squash_pending = False
        self._synced()
        log.info("hub sync: %s", message)
        return True

    def _synced(self) -> None:
        self.last_sync_at = time.time()
        self.last_error = None

    # -- state --

    def readiness(self) -> str | None:
        """A ``/readyz`` reason while syncing is held back, else None."""
        return f"hub sync: {self.held_back}" if self.held_back else None

    def describe(self) -> str:
        """One line for people: the repo, the last sync, the last error."""
        if self.held_back:
            return f"Sync to {self.repo_id} held back: {self.held_back}."
        when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.last_sync_at))
                if self.last_sync_at else "not yet")
        text = f"Synced to {self.repo_id} every {self.settings.sync_every_minutes:g} min; last sync: {when}."
        return text + (f" Last attempt failed: {self.last_error}" if self.last_error else "")


def database_url(settings: Settings) -> str | None:
    """The store's database URL as :meth:`FeedbackStore.from_settings` resolves it (None: SQLite in the data dir)."""
    return settings.database_url or os.environ.get("MMDEMO_DATABASE_URL") or None


def local_store_is_empty(settings: Settings) -> bool:
    """No outputs and no feedback in the store of ``settings`` (a missing SQLite file is empty)."""
    url = database_url(settings)
    if url is None:
        path = settings.data_dir / "feedback.db"
        if not path.is_file() or path.stat().st_size == 0:
            return True
        url = sqlite_url(path)
    db = Database(url, group_commit=False)
    try:
        with db.read() as conn:
            return not any(conn.execute(select(func.count()).select_from(table)).scalar_one()
                           for table in (outputs, feedback) if db.engine.dialect.has_table(conn, table.name))
    finally:
        db.dispose()


def database_digest(snapshot: Path) -> str:
    """SHA-256 of a snapshot's database file: SQLite's backup of an unchanged store is the same bytes
    (``pg_dump`` output holds its time, so a PostgreSQL store is always pushed)."""
    digest = hashlib.sha256()
    for name in (SQLITE_FILE, PG_DUMP_FILE):
        if (snapshot / name).is_file():
            with open(snapshot / name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def synced_files(folder: Path) -> set[str]:
    """The files of the sync folder that belong in the repo: complete snapshots, ``LATEST``, media (no
    partial snapshot, temporary file or download cache: hidden names)."""
    files = {LATEST} if (folder / LATEST).is_file() else set()
    for name in list_snapshots(folder):
        files.update(f"{SNAPSHOTS}/{name}/{path.name}" for path in (folder / SNAPSHOTS / name).iterdir()
                     if path.is_file() and not path.name.startswith("."))
    if (folder / MEDIA).is_dir():
        files.update(path.relative_to(folder).as_posix() for path in (folder / MEDIA).glob("*/*")
                     if path.is_file() and not path.name.startswith("."))
    return files


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
