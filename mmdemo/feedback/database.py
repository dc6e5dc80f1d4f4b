"""The database under the store: an engine for SQLite or PostgreSQL, and its transactions.

SQLite (the default, one file in the data directory) runs in WAL mode with ``synchronous=FULL``:
a committed transaction is on disk before ``commit`` returns, and a crash at any moment leaves a
readable database. Write transactions start with ``BEGIN IMMEDIATE`` (they take the write lock
up front, so two writers never deadlock upgrading a read lock), and the writers of one process
queue on a lock of their own rather than polling SQLite's busy handler. Other processes on the same
file wait up to ``busy_timeout``.

SQLite has one writer at a time and every commit waits for the disk, so under many concurrent
writers :meth:`Database.run_write` *group-commits*: one thread takes the writes waiting in a queue,
runs each inside a savepoint of one transaction (a failing write rolls back alone) and commits them
together, with one fsync. Each caller returns when the commit that holds its write is on disk.
WAL checkpoints (copying committed pages back into the database file) then run in a thread of
their own, so that no write waits for one.

PostgreSQL (``postgresql://...``, for several app replicas sharing one store) runs at READ COMMITTED;
writes that hit a deadlock or a serialization failure are retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import Connection, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from .errors import StoreError, UnusableStoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected
_WRITE_ATTEMPTS = 4
GROUP_COMMIT_MAX = 64  # writes committed together at most (SQLite)
CHECKPOINT_EVERY = 128  # writes between WAL checkpoints (a feedback write adds a few pages)
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def normalise_url(url: str | URL) -> URL:
    """Accept ``postgres://`` and ``postgresql://`` and use the installed psycopg 3 driver."""
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    try:
        parsed = make_url(url)
    except Exception as exc:  # ArgumentError for text that is no URL at all
        raise StoreError(f"The database URL is not understood: {exc}") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"The feedback store runs on SQLite or PostgreSQL, not {parsed.get_backend_name()}.")
    return parsed


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class Database:
    """An engine and the two kinds of transaction the store uses: :meth:`read` and :meth:`write`."""

    def __init__(self, url: str | URL, *, pool_size: int = 16, group_commit: bool = True, echo: bool = False):
        self.url = normalise_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._committer: _GroupCommitter | None = None
        self._group_commit = group_commit and self.is_sqlite
        if self.is_sqlite:
            database = self.url.database or ""
            if database in ("", ":memory:") or database.startswith("file:"):
                raise StoreError("The feedback store needs a SQLite file, not an in-memory database.")
            prepare_sqlite_file(Path(database))
            self.engine = create_engine(
                self.url, echo=echo, pool_size=pool_size, max_overflow=pool_size,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            # With group commit, checkpoints run in the background (see _GroupCommitter)
            autocheckpoint = 0 if self._group_commit else 1000
            event.listen(self.engine, "connect",
                         lambda dbapi_conn, record: _sqlite_connect(dbapi_conn, autocheckpoint))
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = create_engine(
                self.url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
            )

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    def describe(self) -> str:
        """The URL without its password, for logs and messages."""
        return self.url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot (SQLite) or statement-level reads (PostgreSQL)."""
        with self.translate_errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed (durably) when the block ends without an exception."""
        with self.translate_errors():
            if self._write_lock is None:
                with self.engine.connect() as conn, conn.begin():
                    yield conn
                return
            with self._write_lock, self.engine.connect() as conn:
                conn.execution_options(mmdemo_begin="IMMEDIATE")
                with conn.begin():
                    yield conn

    def run_write(self, work: Callable[[Connection], T], on_rollback: Callable[[], None] | None = None) -> T:
        """Run ``work`` in a write transaction, again when PostgreSQL reports a deadlock or a
        serialization failure (``work`` must be safe to repeat: everything it did was rolled back).

        ``on_rollback`` runs after every attempt that did not commit, to undo what ``work`` did
        outside the database.
        """
        if self._group_commit:
            return self._group_committer().submit(work, on_rollback)
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                with self.write() as conn:
                    return work(conn)
            except BaseException as exc:
                if on_rollback is not None:
                    on_rollback()
                cause = exc.__cause__ if isinstance(exc, StoreError) else None
                if attempt == _WRITE_ATTEMPTS or not _retryable(cause):
                    raise
                log.info("retrying a write after %s (attempt %d)", type(cause).__name__, attempt)
                time.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Database failures become :class:`StoreError` with a readable message."""
        try:
            yield
        except OperationalError as exc:
            raise StoreError(f"The feedback database is not available: {_reason(exc)}") from exc
        except DBAPIError as exc:
            raise StoreError(f"The feedback database refused the change: {_reason(exc)}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"The feedback database failed: {exc}") from exc

    def check_readable(self) -> None:
        """Raise :class:`UnusableStoreError` if SQLite finds the database damaged (``PRAGMA quick_check``:
        every page read once, a fraction of a second per 100 MB). PostgreSQL checks its own pages."""
        if not self.is_sqlite:
            return
        path = Path(self.url.database or "")
        try:
            with self.engine.connect() as conn:
                problems = [r for r in conn.exec_driver_sql("PRAGMA quick_check").scalars() if r != "ok"]
        except OperationalError as exc:  # cannot be opened, or busy: not known to be damaged
            raise StoreError(f"The feedback database {path} is not available: {_reason(exc)}") from exc
        except DBAPIError as exc:  # SQLite's "malformed" (corrupt) and "not a database"
            raise UnusableStoreError(f"The feedback database {path} is damaged (SQLite: {_reason(exc)}). "
                                     + recovery_advice(path)) from None
        if problems:
            raise UnusableStoreError(f"The feedback database {path} is damaged (SQLite: {'; '.join(problems[:3])}). "
                                     + recovery_advice(path))

    def integrity_check(self) -> str:
        """``ok``, or what SQLite's ``PRAGMA integrity_check`` found wrong (PostgreSQL: a connection test)."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                rows = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
                fk = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                problems = [r for r in rows if r != "ok"] + [f"foreign key: {tuple(r)}" for r in fk]
                return "ok" if not problems else "; ".join(map(str, problems))
            conn.exec_driver_sql("SELECT 1")
            return "ok"

    def _group_committer(self) -> "_GroupCommitter":
        committer = self._committer
        if committer is None:
            with self._write_lock:  # type: ignore[union-attr]
                if self._committer is None:
                    self._committer = _GroupCommitter(self)
                committer = self._committer
        return committer

    def dispose(self) -> None:
        if self._committer is not None:
            self._committer.stop()
            self._committer = None
        self.engine.dispose()


class _GroupCommitter:
    """One thread that commits the queued writes of a SQLite database in shared transactions."""

    def __init__(self, db: Database):
        self.db = db
        self.queue: "queue.SimpleQueue[tuple[Callable[[Connection], Any], Callable[[], None] | None, Future] | None]"
        self.queue = queue.SimpleQueue()
        self.writes_since_checkpoint = 0
        self.checkpoint_due = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="mmdemo-feedback-writer", daemon=True)
        self.checkpointer = threading.Thread(target=self._checkpoints, name="mmdemo-feedback-checkpoint",
                                             daemon=True)
        self.thread.start()
        self.checkpointer.start()

    def submit(self, work: Callable[[Connection], T], on_rollback: Callable[[], None] | None) -> T:
        if not self.thread.is_alive():
            raise StoreError("The feedback store is closed.")
        future: Future = Future()
        self.queue.put((work, on_rollback, future))
        return future.result()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)
        # Idle pooled connections can keep an old read snapshot open (a cached statement not reset), and
        # the TRUNCATE checkpoint would wait for them until the busy timeout: close them first.
        self.db.engine.dispose()
        self.stopping = True
        self.checkpoint_due.set()
        self.checkpointer.join(timeout=30)

    def _checkpoints(self) -> None:
        """Copy the WAL back into the database now and then, beside the writes (PASSIVE: never
        blocks them); TRUNCATE on the way out, so a closed store leaves a small WAL."""
        while True:
            self.checkpoint_due.wait()
            self.checkpoint_due.clear()
            mode = "TRUNCATE" if self.stopping else "PASSIVE"
            try:
                with self.db.engine.connect() as conn:
                    conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})").fetchall()
            except Exception:  # a busy database: the next checkpoint will do it
                log.debug("WAL checkpoint skipped", exc_info=True)
            if self.stopping:
                return

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < GROUP_COMMIT_MAX:  # take what is waiting; never wait for more
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Callable[[Connection], Any], Callable[[], None] | None, Future]]) -> None:
        done: list[tuple[Callable[[], None] | None, Future, Any]] = []
        try:
            with self.db.write() as conn:
                for work, on_rollback, future in batch:
                    try:
                        with self.db.translate_errors(), conn.begin_nested():  # SAVEPOINT: fails alone
                            result = work(conn)
                    except BaseException as exc:
                        if on_rollback is not None:
                            on_rollback()
                        future.set_exception(exc)
                    else:
                        done.append((on_rollback, future, result))
        except BaseException as exc:  # the commit failed: none of the writes happened
            for on_rollback, future, _ in done:
                if on_rollback is not None:
                    on_rollback()
                future.set_exception(exc if isinstance(exc, StoreError) else StoreError(f"The write failed: {exc}"))
            if not isinstance(exc, Exception):
                raise
            return
        for _, future, result in done:
            future.set_result(result)
        self.writes_since_checkpoint += len(batch)
        if self.writes_since_checkpoint >= CHECKPOINT_EVERY:
            self.writes_since_checkpoint = 0
            self.checkpoint_due.set()


def prepare_sqlite_file(path: Path) -> None:
    """Create a new SQLite database at ``path``, or check that the file there is one.

    A new database is made aside and linked into place (never over a file that appeared meanwhile), so
    that an existing file is never one half-made by another starting process. An existing file that is
    empty or does not start with SQLite's header raises :class:`UnusableStoreError`: SQLite would take
    an empty file for a new database, and the records it should hold would be lost without a word.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _create_sqlite_file(path)
        return
    # Read through SQLite, never with open()/close() of our own: closing any descriptor of the file drops
    # every POSIX lock this process holds on it, so a store already open in this process (an app restarted
    # in the same process, a test) would lose its locks, and another process closing the database could then
    # delete the WAL file under it, with its later writes.
    try:
        header = _sqlite_header(path)
    except OSError as exc:
        raise UnusableStoreError(f"The feedback database {path} cannot be read: {exc.strerror or exc}.") from None
    if not header:
        raise UnusableStoreError(
            f"The feedback database {path} is empty (0 bytes): the records it held are not in it, and mmdemo "
            "will not start a new store over it. " + recovery_advice(path, empty=True))
    if header != SQLITE_HEADER:
        raise UnusableStoreError(
            f"The feedback database {path} is not a SQLite database (it does not start with SQLite's header): "
            "it is damaged, or it is another kind of file. " + recovery_advice(path))


def _sqlite_header(path: Path) -> bytes:
    """The first bytes of ``path`` as SQLite would check them, read without opening it ourselves
    (see :func:`prepare_sqlite_file`): b"" for an empty file, SQLITE_HEADER for a database."""
    if path.stat().st_size == 0:
        return b""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # reads the header page
    except sqlite3.DatabaseError:
        return b"not sqlite"
    finally:
        conn.close()
    return SQLITE_HEADER


def recovery_advice(path: Path, *, empty: bool = False) -> str:
    """How to get a store back from a damaged (or empty) database file, for error messages."""
    recover = "" if empty else (f"or recover what it still holds: sqlite3 {path} .recover | sqlite3 {path}.recovered, "
                                f"then move the damaged file aside and the recovered one to {path}; ")
    return (f"Restore it from a backup, {recover}or, to start a new, empty store, move it aside "
            f"(mv {path} {path}.broken) together with the media folder next to it.")


def _create_sqlite_file(path: Path) -> None:
    """A new, empty SQLite database in WAL mode at ``path``, unless another process made one first."""
    temporary = path.with_name(f".{path.name}.new-{os.getpid()}-{threading.get_ident()}")
    try:
        conn = sqlite3.connect(temporary)
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()  # writes the header
        finally:
            conn.close()
        try:
            os.link(temporary, path)  # fails if the path exists: never replaces a file
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(temporary, path)
    except sqlite3.Error as exc:
        raise StoreError(f"A new feedback database could not be made at {path}: {exc}.") from None
    finally:
        temporary.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)


def _sqlite_connect(dbapi_connection: Any, autocheckpoint: int) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _sqlite_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"The SQLite database could not switch to WAL mode (it is in {mode} mode).")
        cursor.execute("PRAGMA synchronous = FULL")  # acknowledged means on disk
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("mmdemo_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _retryable(exc: BaseException | None) -> bool:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return sqlstate in _RETRYABLE_SQLSTATES


def _reason(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
