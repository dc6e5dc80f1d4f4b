"""Backups of the feedback store that can be taken while the app runs, and restored into an empty store.

    mmdemo backup /mnt/backups/mmdemo            # a new snapshot; media files already there are not copied
    mmdemo restore /mnt/backups/mmdemo           # the newest snapshot, into an empty store

A backup folder holds::

    snapshots/<UTC time>/feedback.db      SQLite: a consistent copy made with SQLite's online backup API
    snapshots/<UTC time>/store.pgdump     PostgreSQL: ``pg_dump --format=custom`` of one exported snapshot
    snapshots/<UTC time>/manifest.json    rows per table, the media refs the snapshot uses, versions
    media/<first two hex>/<ref>           content-addressed files, shared by every snapshot (incremental)
    LATEST                                the newest complete snapshot's name, written last

A snapshot is consistent: the database copy is one transaction's view, and the media it names are copied
after it (media files are immutable and named by their content, so a file that exists is the right one).
A media file deleted between the database copy and its own copy (a data-subject request at that moment) is
listed as ``missing`` in the manifest; its records are restored without it, as the deletion wanted.
Snapshots are written under a hidden name and renamed when complete: a crash mid-backup leaves nothing
that a restore would take. ``keep`` prunes old snapshots and the media only they used.

A restore refuses a store that holds records unless told to replace it; a replaced SQLite file is kept
beside the new one (``feedback.db.before-restore-<time>``), never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from .. import __version__
from .database import Database, sqlite_url
from .errors import StoreError
from .media_store import check_ref
from .migrations import migrate
from .tables import feedback, media, metadata, outputs

SNAPSHOTS = "snapshots"
MEDIA = "media"
LATEST = "LATEST"
MANIFEST = "manifest.json"
SQLITE_FILE = "feedback.db"
PG_DUMP_FILE = "store.pgdump"
_PARTIAL = ".partial-"


class BackupError(StoreError):
    """A backup or restore could not be made; the message says why and what to do."""


@dataclass
class BackupResult:
    folder: Path
    snapshot: str
    backend: str
    rows: dict[str, int]
    media_copied: int = 0
    media_present: int = 0          # already in the backup folder (incremental)
    media_missing: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        text = (f"Backed up the {self.backend} store to {self.folder / SNAPSHOTS / self.snapshot}: "
                f"{self.rows.get('outputs', 0)} outputs, {self.rows.get('feedback', 0)} feedback records; media: "
                f"{self.media_copied} copied, {self.media_present} already there, in {self.seconds:.1f}s.")
        if self.media_missing:
            text += f" {len(self.media_missing)} media file(s) were deleted during the backup and are not in it."
        if self.pruned:
            text += f" Removed old snapshots: {', '.join(self.pruned)}."
        return text


@dataclass
class RestoreResult:
    snapshot: str
    backend: str
    rows: dict[str, int]
    media_restored: int
    kept_aside: Path | None = None

    def describe(self) -> str:
        text = (f"Restored snapshot {self.snapshot} into the {self.backend} store: {self.rows.get('outputs', 0)} "
                f"outputs, {self.rows.get('feedback', 0)} feedback records, {self.media_restored} media files.")
        if self.kept_aside is not None:
            text += f" The store it replaced is kept at {self.kept_aside}."
        return text


# --- backup -----------------------------------------------------------------------------------------------


def backup_store(store: Any, folder: Path, *, keep: int | None = None) -> BackupResult:
    """Write a new snapshot of ``store`` (a :class:`~mmdemo.feedback.FeedbackStore`, open, possibly in use by
    a running app) into ``folder``; media already in ``folder`` are not copied again. ``keep``: keep only
    the newest ``keep`` snapshots (and the media they use)."""
    if keep is not None and keep < 1:
        raise BackupError("keep must be at least 1 snapshot.")
    started = time.perf_counter()
    folder = Path(folder).expanduser()
    (folder / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
    (folder / MEDIA).mkdir(exist_ok=True)
    name = _new_snapshot_name(folder)
    partial = folder / SNAPSHOTS / f"{_PARTIAL}{name}"
    partial.mkdir()
    try:
        db = store.db
        if db.is_sqlite:
            refs, rows = _snapshot_sqlite(db, partial / SQLITE_FILE)
        else:
            refs, rows = _snapshot_postgres(db, partial / PG_DUMP_FILE)
        copied, present, missing = _copy_media(refs, store.media.root, folder / MEDIA)
        manifest = {"snapshot": name, "backend": db.backend, "created_at": _now_iso(), "mmdemo": __version__,
                    "rows": rows, "media": sorted(set(refs) - set(missing)), "missing": missing}
        _write_json(partial / MANIFEST, manifest)
        _fsync_tree(partial)
        os.replace(partial, folder / SNAPSHOTS / name)
        _write_atomically(folder / LATEST, name + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    pruned = _prune(folder, keep) if keep else []
    return BackupResult(folder, name, db.backend, rows, copied, present, missing, pruned,
                        round(time.perf_counter() - started, 3))


def list_snapshots(folder: Path) -> list[str]:
    """The complete snapshots in ``folder``, oldest first."""
    root = Path(folder) / SNAPSHOTS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / MANIFEST).is_file())


def _snapshot_sqlite(db: Database, target: Path) -> tuple[list[str], dict[str, int]]:
    """SQLite's online backup API: a consistent copy even while the app writes (WAL included)."""
    source_path = db.url.database
    if not source_path or source_path == ":memory:":
        raise BackupError("An in-memory SQLite store cannot be backed up.")
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy, pages=4096, sleep=0.001)
        copy.commit()
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file: no -wal/-shm beside it
    finally:
        source.close()
        copy.close()
    with _sqlite_readonly(target) as conn:
        refs = [row[0] for row in conn.execute("SELECT ref FROM media")]
        rows = _count_sqlite(conn)
    return refs, rows


def _snapshot_postgres(db: Database, target: Path) -> tuple[list[str], dict[str, int]]:
    """``pg_dump`` of an exported snapshot; the media refs and row counts are read in that same snapshot."""
    pg_dump = find_postgres_tool("pg_dump")
    with db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            snapshot_id = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
            refs = list(conn.execute(select(media.c.ref)).scalars())
            rows = {table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                    for table in metadata.sorted_tables}
            _run_postgres_tool([pg_dump, "--format=custom", "--no-owner", f"--snapshot={snapshot_id}",
                                f"--file={target}"], db)
    return refs, rows


def _copy_media(refs: Iterable[str], source: Path, target: Path) -> tuple[int, int, list[str]]:
    copied = present = 0
    missing: list[str] = []
    for ref in refs:
        check_ref(ref)
        destination = target / ref[:2] / ref
        if destination.is_file():
            present += 1
            continue
        origin = source / ref[:2] / ref
        try:
            _copy_atomically(origin, destination)
        except FileNotFoundError:
            missing.append(ref)
            continue
        copied += 1
    return copied, present, missing


def _prune(folder: Path, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` snapshots, then the media no kept snapshot names."""
    snapshots = list_snapshots(folder)
    old = snapshots[:-keep]
    for name in old:
        shutil.rmtree(folder / SNAPSHOTS / name)
    if old:
        used = set()
        for name in snapshots[-keep:]:
            used.update(json.loads((folder / SNAPSHOTS / name / MANIFEST).read_text(encoding="utf-8"))["media"])
        for path in (folder / MEDIA).glob("*/*"):
            if path.name not in used:
                path.unlink()
    return old


# --- restore ----------------------------------------------------------------------------------------------


def restore_store(folder: Path, data_dir: Path, database_url: str | None = None, *, snapshot: str | None = None,
                  replace: bool = False) -> RestoreResult:
    """Restore ``snapshot`` (default: the newest) of backup ``folder`` into the store of ``data_dir`` /
    ``database_url`` (None: SQLite in ``data_dir``), which must hold no records unless ``replace``. Stop the
    app that uses the store first."""
    folder = Path(folder).expanduser()
    snapshots = list_snapshots(folder)
    if not snapshots:
        raise BackupError(f"{folder} holds no complete backup snapshot (expected {SNAPSHOTS}/<time>/{MANIFEST}).")
    if snapshot is not None:
        name = snapshot
    elif (folder / LATEST).is_file():
        name = (folder / LATEST).read_text(encoding="utf-8").strip()
    else:
        name = snapshots[-1]
    if name not in snapshots:
        raise BackupError(f"No snapshot {name!r} in {folder}; snapshots: {', '.join(snapshots)}.")
    source = folder / SNAPSHOTS / name
    manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or sqlite_url(data_dir / SQLITE_FILE)
    target_backend = make_url(url).get_backend_name()
    if target_backend != ("sqlite" if manifest["backend"] == "sqlite" else "postgresql"):
        raise BackupError(f"Snapshot {name} is of a {manifest['backend']} store; restore it into the same kind "
                          f"of store (the target is {target_backend}).")
    # the media first: a store restored without its files would be refused when it opens
    restored, _, missing = _copy_media(manifest["media"], folder / MEDIA, data_dir / MEDIA)
    if missing:
        raise BackupError(f"The backup folder lacks {len(missing)} media file(s) its snapshot names (first: "
                          f"{missing[0]}); it was changed or pruned by hand. Nothing was restored.")
    kept_aside = None
    if target_backend == "sqlite":
        kept_aside = _restore_sqlite(source / SQLITE_FILE, Path(make_url(url).database), replace=replace)
    else:
        _restore_postgres(source / PG_DUMP_FILE, url, replace=replace)
    db = Database(url, group_commit=False)
    try:
        migrate(db)  # an older snapshot is brought to this version's schema
        with db.read() as conn:
            rows = {table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                    for table in metadata.sorted_tables}
    finally:
        db.dispose()
    return RestoreResult(name, manifest["backend"], rows, restored, kept_aside)


def _restore_sqlite(snapshot_file: Path, target: Path, *, replace: bool) -> Path | None:
    kept_aside = None
    if target.exists() and target.stat().st_size > 0:
        with _sqlite_readonly(target) as conn:
            held = _count_sqlite(conn)
        if (held.get("outputs", 0) or held.get("feedback", 0)) and not replace:
            raise BackupError(f"The store {target} holds {held.get('outputs', 0)} outputs and "
                              f"{held.get('feedback', 0)} feedback records; restore into an empty store, or pass "
                              "--replace (the current store is then kept beside it, not deleted).")
        kept_aside = target.with_name(f"{target.name}.before-restore-{_stamp()}")
        with sqlite3.connect(target) as conn:  # fold the WAL into the file before moving it aside
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        os.replace(target, kept_aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".restore-", dir=target.parent)
    os.close(fd)
    try:
        source = sqlite3.connect(f"file:{snapshot_file}?mode=ro", uri=True)
        copy = sqlite3.connect(temporary)
        try:
            source.backup(copy)
            copy.commit()
        finally:
            source.close()
            copy.close()
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return kept_aside


def _restore_postgres(dump: Path, url: str, *, replace: bool) -> None:
    db = Database(url, group_commit=False)
    try:
        with db.read() as conn:
            held = {table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                    for table in (outputs, feedback) if db.engine.dialect.has_table(conn, table.name)}
        if any(held.values()) and not replace:
            raise BackupError(f"The store {db.describe()} holds {held.get('outputs', 0)} outputs and "
                              f"{held.get('feedback', 0)} feedback records; restore into an empty database, or "
                              "pass --replace (its mmdemo tables are then dropped and replaced).")
        _run_postgres_tool([find_postgres_tool("pg_restore"), "--clean", "--if-exists", "--no-owner",
                            "--single-transaction", "--exit-on-error", str(dump)], db, database_flag=True)
    finally:
        db.dispose()


# --- helpers ----------------------------------------------------------------------------------------------


def find_postgres_tool(name: str) -> str:
    """``pg_dump`` / ``pg_restore``: from ``MMDEMO_PG_BIN``, ``PATH``, or the newest Debian install."""
    folder = os.environ.get("MMDEMO_PG_BIN")
    if folder and (Path(folder) / name).is_file():
        return str(Path(folder) / name)
    found = shutil.which(name)
    if found:
        return found
    installed = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                       key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if installed:
        return str(installed[-1])
    raise BackupError(f"{name} was not found: install the PostgreSQL client tools or set MMDEMO_PG_BIN to "
                      "the folder that holds them.")


def _run_postgres_tool(command: list[str], db: Database, *, database_flag: bool = False) -> None:
    """Run a PostgreSQL tool on ``db``: the connection string without the password, which goes in the
    environment (never on a command line other users can read)."""
    url = db.url
    env = {**os.environ}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    conninfo = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    command = [*command[:1], f"--dbname={conninfo}", *command[1:]]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[-800:]}")


class _sqlite_readonly:
    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: Any) -> None:
        self.conn.close()


def _count_sqlite(conn: sqlite3.Connection) -> dict[str, int]:
    present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {table.name: conn.execute(f'SELECT COUNT(*) FROM "{table.name}"').fetchone()[0]
            for table in metadata.sorted_tables if table.name in present}


def _copy_atomically(origin: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=destination.parent)
    try:
        with open(origin, "rb") as source, os.fdopen(fd, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    _write_atomically(path, json.dumps(data, indent=1) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _new_snapshot_name(folder: Path) -> str:
    name = _stamp()
    while (folder / SNAPSHOTS / name).exists():  # two backups within one second
        time.sleep(0.01)
        name = _stamp()
    return name


def _stamp() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
