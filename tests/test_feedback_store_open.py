"""Opening the feedback store never loses records: an empty, damaged or foreign database, or a missing
media folder, is refused with a message that names the file and how to recover (the store, the CLI and
``mmdemo serve`` / ``python app.py``, which exit before serving); a new path still makes a new store."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, inspect, text

from mmdemo.cli import main
from mmdemo.feedback import FeedbackStore, StoreError, UnusableStoreError
from mmdemo.feedback.finetune_jobs import FinetuneJobStore

ROOT = Path(__file__).resolve().parents[1]
MMDEMO_TABLES = {"schema_migrations", "media", "outputs", "output_media", "feedback"}


def record_one(data_dir: Path, database_url: str | None = None) -> str:
    """A store with one output (and its image) and one feedback record; returns the output id."""
    with FeedbackStore(database_url, data_dir) as store:
        output_id = store.record_output("image-to-text", inputs={"image": Image.new("RGB", (8, 8), "teal")},
                                        output={"text": "a teal square"})
        store.add_feedback(output_id, annotator="alice", correction="a teal tile")
    return output_id


def overwrite(path: Path, start: int, end: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    end = len(data) if end is None else end
    data[start:end] = bytes((i * 37 + 11) % 256 for i in range(end - start))
    path.write_bytes(bytes(data))


def empty_file(db: Path) -> None:
    db.write_bytes(b"")


def garbage_file(db: Path) -> None:
    db.write_bytes(bytes((i * 7919) % 256 for i in range(20_000)))


def header_overwritten(db: Path) -> None:
    record_one(db.parent)
    overwrite(db, 0, 100)


def pages_overwritten(db: Path) -> None:
    record_one(db.parent)
    overwrite(db, 4096)  # every page after the first (which holds the schema)


def truncated(db: Path) -> None:
    record_one(db.parent)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


# --- SQLite files that are not a usable store ------------------------------------------------------------


@pytest.mark.parametrize("damage, what", [
    (empty_file, "is empty (0 bytes)"),
    (garbage_file, "is not a SQLite database"),
    (header_overwritten, "is not a SQLite database"),
    (pages_overwritten, "is damaged"),
    (truncated, "is damaged"),
])
def test_an_empty_or_damaged_database_file_is_refused_and_left_as_it_was(tmp_path, damage, what):
    db = tmp_path / "feedback.db"
    damage(db)
    before = db.read_bytes()
    with pytest.raises(UnusableStoreError) as refused:
        FeedbackStore(None, tmp_path)
    message = str(refused.value)
    assert what in message and str(db) in message
    assert "backup" in message and f"mv {db}" in message  # how to recover, or to start afresh
    if what != "is empty (0 bytes)":
        assert f"sqlite3 {db} .recover" in message
    assert db.read_bytes() == before  # nothing was written into it: the damage can still be recovered


def test_a_sqlite_database_of_another_application_is_refused_not_migrated(tmp_path):
    db = tmp_path / "feedback.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    with pytest.raises(UnusableStoreError, match=r"another application's tables \(invoices\)") as refused:
        FeedbackStore(None, tmp_path)
    assert str(db) in str(refused.value)
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"invoices"}


def test_a_new_path_makes_a_store_and_an_existing_store_opens_with_its_records(tmp_path):
    data_dir = tmp_path / "new" / "data"
    output_id = record_one(data_dir)  # no file there: a new store
    with FeedbackStore(None, data_dir) as store:
        assert store.count() == 1 and store.get_output(output_id).output["text"] == "a teal square"
        assert store.integrity_check() == "ok"
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".feedback.db.new")]  # no leftovers


# --- the same checks on PostgreSQL ---------------------------------------------------------------------------


def test_a_second_store_opened_in_the_process_leaves_the_first_one_writing_to_the_database(tmp_path):
    """Opening a store checks the file without open()/close() of its own: that dropped the POSIX locks of a
    store already open in the process, and another process closing the database then deleted the WAL under
    it, so its later writes went nowhere (an app restarted in the same process lost its fine-tuning jobs)."""
    first = FeedbackStore(None, tmp_path)
    first.db.engine.connect().close()  # a pooled connection holds the WAL open, as a serving app's do
    with FeedbackStore(None, tmp_path):
        pass
    reader = f"from mmdemo.feedback import FeedbackStore\nFeedbackStore(None, {str(tmp_path)!r}).close()"
    subprocess.run([sys.executable, "-c", reader], check=True, timeout=120)  # another process opens and closes
    FinetuneJobStore(first).create("blip-ours", "image-to-text", "tiny-blip-caption", "cpu", {})  # a write
    seen = subprocess.run([sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
                           "'select name from finetune_jobs').fetchall())", str(tmp_path / "feedback.db")],
                          capture_output=True, text=True, check=True, timeout=60)
    first.close()
    assert seen.stdout.strip() == "[('blip-ours',)]"


@pytest.fixture
def pg_url(pg_server, pg_database):
    pg_server.reset_database(pg_database)
    return pg_database


def test_a_postgresql_database_of_another_application_is_refused_not_migrated(pg_url, tmp_path):
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE invoices (id serial PRIMARY KEY, total real)"))
        with pytest.raises(UnusableStoreError, match=r"another application's tables \(invoices\)"):
            FeedbackStore(pg_url, tmp_path)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"invoices"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_missing_media_folder_is_refused_while_records_use_it(backend, request, tmp_path):
    url = None if backend == "sqlite" else request.getfixturevalue("pg_url")
    with FeedbackStore(url, tmp_path / "empty") as store:  # no records: no media folder needed
        assert store.count() == 0 and not store.media.root.exists()
    record_one(tmp_path / "data", url)
    media = tmp_path / "data" / "media"
    media.rename(tmp_path / "media-elsewhere")
    with pytest.raises(UnusableStoreError, match="media folder .* is missing") as refused:
        FeedbackStore(url, tmp_path / "data")
    assert str(media) in str(refused.value) and "MMDEMO_DATA_DIR" in str(refused.value)
    media.mkdir()  # an empty folder in its place (a volume not mounted): refused as well
    with pytest.raises(UnusableStoreError, match="holds none of the 1 files"):
        FeedbackStore(url, tmp_path / "data")
    media.rmdir()
    (tmp_path / "media-elsewhere").rename(media)
    with FeedbackStore(url, tmp_path / "data") as store:
        assert store.count() == 1


def test_the_sweep_keeps_media_files_when_the_database_refers_to_none(tmp_path):
    """A new database beside an old media folder (the old database moved aside) must not empty the folder."""
    record_one(tmp_path)
    files = sorted((tmp_path / "media").rglob("*.png"))
    (tmp_path / "feedback.db").rename(tmp_path / "feedback.db.old")
    with FeedbackStore(None, tmp_path) as store:
        assert store.sweep_media(older_than=-1) == []
    assert sorted((tmp_path / "media").rglob("*.png")) == files


# --- the CLI and the app refuse to start --------------------------------------------------------------------


def test_cli_commands_refuse_a_damaged_store_with_a_message(tmp_path, capsys):
    garbage_file(tmp_path / "feedback.db")
    assert main(["delete", "--data-dir", str(tmp_path), "--record", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: The feedback database {tmp_path / 'feedback.db'} is not a SQLite database")
    assert "Traceback" not in err
    assert main(["export", "--task", "caption", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "is not a SQLite database" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("entry", [["app.py"], ["-m", "mmdemo", "serve"]])
def test_serve_exits_before_serving_when_the_database_file_is_empty(tmp_path, entry):
    (tmp_path / "feedback.db").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMDEMO_")}
    env.update(PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, *entry, "--profile", "tiny", "--data-dir", str(tmp_path), "--port", str(_free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert f"error: The feedback database {tmp_path / 'feedback.db'} is empty (0 bytes)" in completed.stderr
    assert "Traceback" not in completed.stderr and "Running on" not in completed.stdout
    assert (tmp_path / "feedback.db").stat().st_size == 0


def test_the_app_context_keeps_refusing_and_logs_why(tmp_path, caplog):
    from mmdemo.config import Settings
    from mmdemo.ui.common import AppContext

    garbage_file(tmp_path / "feedback.db")
    ctx = AppContext.create(Settings(profile="tiny", data_dir=tmp_path))
    with pytest.raises(UnusableStoreError, match="is not a SQLite database"):
        ctx.open_store()
    with pytest.raises(StoreError, match="could not be opened; see the server log"):
        ctx.store  # noqa: B018 - what the tabs see: no path, the log has the details
    assert "is not a SQLite database" in caplog.text


def test_the_start_up_sweep_never_deletes_media_when_the_database_file_was_emptied(tmp_path):
    """Before: SQLite took the 0-byte file for a new database, and the start-up sweep then removed every media
    file (none referenced) older than an hour."""
    from mmdemo.config import Settings
    from mmdemo.application import App
    from mmdemo.server import tidy_feedback_store_in_background

    record_one(tmp_path)
    files = sorted((tmp_path / "media").rglob("*.png"))
    for path in files:
        os.utime(path, (path.stat().st_atime - 7200, path.stat().st_mtime - 7200))  # two hours old
    (tmp_path / "feedback.db").write_bytes(b"")
    ctx = App.build(Settings(profile="tiny", data_dir=tmp_path))
    tidy_feedback_store_in_background(ctx).join(timeout=60)
    assert sorted((tmp_path / "media").rglob("*.png")) == files and all(path.is_file() for path in files)
    assert (tmp_path / "feedback.db").stat().st_size == 0
