"""`mmdemo backup` / `mmdemo restore`: consistent snapshots taken while the store is written, incremental
media, restore into an empty store (refusing a full one), on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_feedback_store import caption_output  # noqa: E402

from mmdemo.cli import main  # noqa: E402
from mmdemo.feedback import FeedbackStore  # noqa: E402
from mmdemo.feedback import backup as backup_module  # noqa: E402
from mmdemo.feedback.backup import (  # noqa: E402
    BackupError, LATEST, MEDIA, SNAPSHOTS, backup_store, list_snapshots, restore_store,
)


def empty_target(request) -> str | None:
    """A second, empty store of the same kind as the test's: SQLite in a folder (None), or a new PostgreSQL
    database (its URL)."""
    if request.node.callspec.params.get("store_on_each_database") == "postgres":
        return request.getfixturevalue("pg_server").create_database("mmdemo_restore")
    return None


def stored_ids(store: FeedbackStore) -> tuple[set[str], set[int]]:
    from sqlalchemy import select

    from mmdemo.feedback.tables import feedback, outputs

    with store.db.read() as conn:
        return (set(conn.execute(select(outputs.c.id)).scalars()),
                set(conn.execute(select(feedback.c.id)).scalars()))


def test_a_backup_taken_while_writers_run_restores_every_acknowledged_record(store_on_each_database, tmp_path,
                                                                            request):
    store = store_on_each_database
    for n in range(5):
        caption_output(store, n)
    acknowledged: list[tuple[str, int]] = []  # (output, feedback record) pairs the store confirmed
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(1000, 100_000))
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                with lock:
                    n = next(counter)
                output_id = caption_output(store, n)
                saved = store.add_feedback(output_id, annotator="alice", thumbs=1, correction=f"fixed {n}")
                with lock:
                    acknowledged.append((output_id, saved.id))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 10 and not failures and time.monotonic() < deadline:  # writes under way
        time.sleep(0.01)
    assert not failures, failures
    with lock:
        before = list(acknowledged)
    result = backup_store(store, tmp_path / "backup")
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert result.rows["feedback"] >= len(before) and not result.media_missing

    restored_dir, url = tmp_path / "restored", empty_target(request)
    restored = restore_store(tmp_path / "backup", restored_dir, url)
    assert restored.snapshot == result.snapshot and restored.rows == result.rows
    with FeedbackStore(url, restored_dir) as copy:
        outputs_there, records_there = stored_ids(copy)
        assert {o for o, _ in before} <= outputs_there and {r for _, r in before} <= records_there
        for output_id in outputs_there:  # every restored record opens with its media file
            record = copy.get_output(output_id)
            assert all(copy.media_path(ref).is_file() for ref in record.input_media + record.output_media)
        assert copy.get(before[0][1]).correction == store.get(before[0][1]).correction


def test_the_second_backup_copies_only_new_media_and_keep_prunes_old_snapshots(tmp_path):
    with FeedbackStore(None, tmp_path / "data") as store:
        for n in range(4):
            caption_output(store, n)
        first = backup_store(store, tmp_path / "backup")
        caption_output(store, 99)
        second = backup_store(store, tmp_path / "backup")
        assert (first.media_copied, first.media_present) == (4, 0)
        assert (second.media_copied, second.media_present) == (1, 4)
        output_id = caption_output(store, 100)
        store.delete_output(output_id, actor_role="admin")  # its image is used by nothing any more
        third = backup_store(store, tmp_path / "backup", keep=1)
    assert third.pruned == [first.snapshot, second.snapshot]
    assert list_snapshots(tmp_path / "backup") == [third.snapshot]
    assert (tmp_path / "backup" / LATEST).read_text().strip() == third.snapshot
    kept = json.loads((tmp_path / "backup" / SNAPSHOTS / third.snapshot / "manifest.json").read_text())["media"]
    assert sorted(p.name for p in (tmp_path / "backup" / MEDIA).glob("*/*")) == sorted(kept) and len(kept) == 5


def test_restore_refuses_a_store_with_records_and_keeps_the_replaced_one(tmp_path):
    with FeedbackStore(None, tmp_path / "data") as store:
        caption_output(store, 1)
        backup_store(store, tmp_path / "backup")
    with FeedbackStore(None, tmp_path / "other") as other:
        kept_id = caption_output(other, 7)
    with pytest.raises(BackupError, match="holds 1 outputs .* --replace"):
        restore_store(tmp_path / "backup", tmp_path / "other")
    with FeedbackStore(None, tmp_path / "other") as other:  # untouched by the refusal
        assert stored_ids(other)[0] == {kept_id}
    result = restore_store(tmp_path / "backup", tmp_path / "other", replace=True)
    assert result.kept_aside is not None and result.kept_aside.is_file()
    with FeedbackStore(None, tmp_path / "other") as other:
        assert kept_id not in stored_ids(other)[0] and len(stored_ids(other)[0]) == 1
    with FeedbackStore(f"sqlite:///{result.kept_aside}", tmp_path / "other") as aside:
        assert stored_ids(aside)[0] == {kept_id}


def test_a_media_file_deleted_during_the_backup_is_listed_missing_and_the_rest_restores(tmp_path, monkeypatch):
    with FeedbackStore(None, tmp_path / "data") as store:
        doomed = caption_output(store, 1)
        kept = caption_output(store, 2)
        doomed_ref = store.get_output(doomed).input_media[0]
        snapshot = backup_module._snapshot_sqlite

        def snapshot_then_delete(db, target):  # a data-subject deletion lands between the two halves
            found = snapshot(db, target)
            store.delete_output(doomed, actor_role="admin")
            return found

        monkeypatch.setattr(backup_module, "_snapshot_sqlite", snapshot_then_delete)
        result = backup_store(store, tmp_path / "backup")
    assert result.media_missing == [doomed_ref]
    restore_store(tmp_path / "backup", tmp_path / "restored")
    with FeedbackStore(None, tmp_path / "restored") as copy:
        assert copy.media_path(copy.get_output(kept).input_media[0]).is_file()


def test_an_interrupted_backup_leaves_no_snapshot_a_restore_would_take(tmp_path, monkeypatch):
    with FeedbackStore(None, tmp_path / "data") as store:
        caption_output(store, 1)

        def fail(*args):
            raise OSError("disk full")

        monkeypatch.setattr(backup_module, "_copy_media", fail)
        with pytest.raises(OSError, match="disk full"):
            backup_store(store, tmp_path / "backup")
    assert list_snapshots(tmp_path / "backup") == []
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "backup" / SNAPSHOTS).iterdir())
    with pytest.raises(BackupError, match="no complete backup snapshot"):
        restore_store(tmp_path / "backup", tmp_path / "restored")


def test_the_cli_backs_up_a_running_apps_store_and_restores_it(launch_app, tmp_path, capsys):
    """`mmdemo backup` next to a served app (its store open and in use), then `mmdemo restore`."""
    from gradio_client import Client, handle_file

    database = f"sqlite:///{tmp_path / 'served.db'}"
    app = launch_app(database_url=database)
    client = Client(app.url, verbose=False)
    _, _, details = client.predict(handle_file(str(Path(__file__).parent.parent / "assets" / "cat.jpg")),
                                   api_name="/caption")
    app.flush_records()
    served = ["--data-dir", str(app.settings.data_dir), "--database-url", database]
    assert main(["backup", str(tmp_path / "backup"), *served, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"]["outputs"] == 1 and report["media_copied"] == 1
    assert main(["restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "copy")]) == 0
    assert "Restored snapshot" in capsys.readouterr().out
    assert main(["restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "copy")]) == 1
    assert "--replace" in capsys.readouterr().err
    with FeedbackStore(None, tmp_path / "copy") as copy:
        assert stored_ids(copy)[0] == {details["output_id"]}
