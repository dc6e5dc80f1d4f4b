"""The store's sync to a Hub dataset repo (mmdemo.sync), through a local stand-in for ``HfApi``
(tests/hub_standin.py): round trip, incremental media, deletions reaching the repo and its history, a
SIGKILL between and during syncs, a sync at graceful shutdown, a repo out of reach at start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_standin import LocalHub  # noqa: E402
from test_backup import empty_target  # noqa: E402
from test_feedback_store import caption_output, t2i_output  # noqa: E402

from mmdemo.application import App  # noqa: E402
from mmdemo.config import Settings  # noqa: E402
from mmdemo.errors import InvalidInputError  # noqa: E402
from mmdemo.feedback import FeedbackStore  # noqa: E402
from mmdemo.sync import HubSync  # noqa: E402
from mmdemo.ui import models_panel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "cat.jpg"
REPO = "someone/mmdemo-labels"


def settings_for(data_dir: Path, **changes) -> Settings:
    return Settings(profile="tiny", data_dir=data_dir, sync_repo=REPO, **changes)


def media_of(data_dir: Path) -> dict[str, bytes]:
    """The store's media files: name (their content hash) -> bytes."""
    return {path.name: path.read_bytes() for path in (data_dir / "media").glob("*/*") if path.is_file()}


def contents(store: FeedbackStore) -> tuple[set[str], dict[int, tuple[str, str | None]]]:
    """The output ids and the feedback records (id -> output id, correction) of ``store``."""
    with store.db.read() as conn:
        outputs = {row[0] for row in conn.exec_driver_sql("SELECT id FROM outputs")}
    return outputs, {record.id: (record.output_id, record.correction) for record in store.iter_records()}


def restored(hub: LocalHub, data_dir: Path, database_url: str | None = None) -> FeedbackStore:
    """A fresh data dir (and database) restored from the repo, as an app starting on an empty disk does; the
    store open."""
    sync = HubSync(settings_for(data_dir, database_url=database_url), lambda: None, hub)
    result = sync.restore_at_start()
    assert result is not None and sync.held_back is None, sync.held_back
    store = FeedbackStore(database_url, data_dir)
    assert store.integrity_check() == "ok"
    return store


def record_some(store: FeedbackStore, first: int, count: int) -> list[str]:
    ids = []
    for n in range(first, first + count):
        output_id = caption_output(store, n)
        store.add_feedback(output_id, annotator="alice", thumbs=1, correction=f"fixed {n}")
        ids.append(output_id)
    return ids


def test_settings_check_the_repo_id_and_the_interval(tmp_path):
    with pytest.raises(InvalidInputError, match="owner/name"):
        Settings(data_dir=tmp_path, sync_repo="no-owner")
    with pytest.raises(InvalidInputError, match="MMDEMO_SYNC_EVERY_MINUTES"):
        Settings(data_dir=tmp_path, sync_repo=REPO, sync_every_minutes=0)
    settings = Settings.from_env({"MMDEMO_SYNC_REPO": REPO, "MMDEMO_SYNC_EVERY_MINUTES": "2.5"}, data_dir=tmp_path)
    assert (settings.sync_repo, settings.sync_every_minutes) == (REPO, 2.5)


def test_everything_synced_comes_back_after_the_data_dir_is_wiped(store_on_each_database, tmp_path, request):
    store, hub = store_on_each_database, LocalHub(tmp_path / "hub")
    data_dir = store.data_dir
    assert HubSync(settings_for(tmp_path / "new"), lambda: None, hub).restore_at_start() is None  # no repo yet
    record_some(store, 0, 4)
    t2i_output(store, count=3)
    before, media_before = contents(store), media_of(data_dir)
    assert len(media_before) == 7
    sync = HubSync(settings_for(data_dir), lambda: store, hub)
    assert sync.sync_now(), sync.last_error
    state = hub.state(REPO)
    assert state["private"] and state["repo_type"] == "dataset"
    # the repo holds one self-contained snapshot (no -wal/-shm beside a SQLite database) and the media
    snapshot_files = sorted(path.rsplit("/", 1)[1] for path in hub.files(REPO) if path.startswith("snapshots/"))
    assert snapshot_files == (["feedback.db", "manifest.json"] if store.db.is_sqlite
                              else ["manifest.json", "store.pgdump"])

    # the Space restarts on an empty disk (and, on PostgreSQL, an empty database)
    target_url, target_dir = empty_target(request), tmp_path / "wiped"
    store = restored(hub, target_dir, target_url)
    try:
        assert contents(store) == before
        assert media_of(target_dir) == media_before  # byte for byte
    finally:
        store.close()
    # a store that holds records is never replaced by the repo's snapshot
    assert HubSync(settings_for(target_dir, database_url=target_url), lambda: None, hub).restore_at_start() is None


def test_a_second_sync_uploads_only_the_new_media_and_an_unchanged_store_makes_no_commit(tmp_path):
    hub, data_dir = LocalHub(tmp_path / "hub"), tmp_path / "data"
    store = FeedbackStore(None, data_dir)
    sync = HubSync(settings_for(data_dir), lambda: store, hub)
    record_some(store, 0, 3)
    assert sync.sync_now()
    new_output = caption_output(store, 10)
    new_ref = store.get_output(new_output).input_media[0]
    assert sync.sync_now()
    first, second = hub.commits_made(REPO)
    added_media = [op["path"] for op in second["operations"] if op["op"] == "add" and op["path"].startswith("media/")]
    assert len([op for op in first["operations"] if op["path"].startswith("media/")]) == 3
    assert added_media == [f"media/{new_ref[:2]}/{new_ref}"]
    # the old snapshot is deleted in the same commit, no media is
    deleted = [op["path"] for op in second["operations"] if op["op"] == "delete"]
    assert deleted and all(path.startswith("snapshots/") for path in deleted)
    assert sync.sync_now()
    assert len(hub.commits_made(REPO)) == 2  # nothing was written since
    store.close()


def test_a_deleted_output_leaves_the_repo_and_its_history(tmp_path):
    hub, data_dir = LocalHub(tmp_path / "hub"), tmp_path / "data"
    store = FeedbackStore(None, data_dir)
    sync = HubSync(settings_for(data_dir), lambda: store, hub)
    kept, gone = record_some(store, 0, 1)[0], record_some(store, 1, 1)[0]
    gone_ref = store.get_output(gone).input_media[0]
    gone_bytes = store.media_path(gone_ref).read_bytes()
    assert sync.sync_now()
    assert gone_bytes in hub.all_contents(REPO)
    store.delete_output(gone, actor_role="admin")  # a data-subject request
    assert sync.sync_now()
    store.close()
    journal = hub.journal(REPO)
    deletion = journal[-2]
    assert {"op": "delete", "path": f"media/{gone_ref[:2]}/{gone_ref}"} in deletion["operations"]
    assert "squash" in journal[-1]  # right after the commit that deleted it
    assert len(hub.state(REPO)["commits"]) == 1
    # no commit of the history can give the file or the output's record back
    assert gone_bytes not in hub.all_contents(REPO)
    databases = [blob for blob in hub.all_contents(REPO) if blob.startswith(b"SQLite format 3")]
    assert len(databases) == 1 and gone_ref.encode() not in databases[0] and kept.encode() in databases[0]
    snapshot = tmp_path / "snapshot.db"
    snapshot.write_bytes(databases[0])
    with sqlite3.connect(snapshot) as conn:  # the output's id stays only in the audit log's deletion entry
        assert conn.execute("SELECT COUNT(*) FROM outputs WHERE id = ?", (gone,)).fetchone() == (0,)
        assert conn.execute("SELECT action FROM audit_log WHERE target = ?", (gone,)).fetchall() == [("delete_output",)]
    conn.close()
    store = restored(hub, tmp_path / "again")
    try:
        assert contents(store)[0] == {kept}
    finally:
        store.close()


CHILD = r"""
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from hub_standin import LocalHub
from test_feedback_store import caption_output
from mmdemo.config import Settings
from mmdemo.feedback import FeedbackStore
from mmdemo.sync import HubSync

data_dir, hub_root, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
store = FeedbackStore(None, data_dir)
sync = HubSync(Settings(profile="tiny", data_dir=data_dir, sync_repo="someone/mmdemo-labels"), lambda: store,
               LocalHub(hub_root))

def say(kind, ids):
    print(json.dumps({kind: sorted(ids)}), flush=True)

recorded, n = [], 0
def record(count):
    global n
    for _ in range(count):
        output_id = caption_output(store, n)
        store.add_feedback(output_id, annotator="alice", thumbs=1, correction=f"fixed {n}")
        recorded.append(output_id)
        n += 1

record(5)
assert sync.sync_now()
say("synced", recorded)
if mode == "between":
    record(5)
    say("recorded", recorded)
    while True:  # still writing when the kill comes
        record(1)
else:  # "during": syncs back to back while records are written
    writer = threading.Thread(target=lambda: [record(1) or time.sleep(0.01) for _ in iter(int, 1)], daemon=True)
    writer.start()
    while True:
        before = list(recorded)
        assert sync.sync_now()
        say("synced", before)
"""


@pytest.mark.parametrize("mode", ["between", "during"])
def test_a_sigkill_loses_at_most_what_came_after_the_last_sync(tmp_path, mode):
    data_dir, hub_root = tmp_path / "data", tmp_path / "hub"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir), str(hub_root), mode, str(ROOT / "tests")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    synced: list[str] = []
    try:
        deadline = time.monotonic() + 120
        syncs = 0
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, child.communicate()[1]
            message = json.loads(line)
            if "synced" in message:
                synced, syncs = message["synced"], syncs + 1
                if mode == "during" and syncs >= 3:
                    time.sleep(0.05)  # into the next sync
                    break
            elif "recorded" in message:  # between syncs, with records the repo does not have
                assert len(message["recorded"]) == len(synced) + 5
                break
        else:
            raise AssertionError("the child never got there")
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    hub = LocalHub(hub_root)
    store = restored(hub, tmp_path / "restored")
    try:
        outputs, records = contents(store)
        if mode == "between":
            assert outputs == set(synced)
        else:  # a sync that finished after the last line read may add some; none is lost or half there
            assert outputs >= set(synced)
        assert {output_id for output_id, _ in records.values()} <= outputs  # no feedback without its output
        if mode == "between":
            assert len(records) == len(outputs)  # each output with its feedback
        for output_id in outputs:
            for ref in store.get_output(output_id).input_media:
                original = data_dir / "media" / ref[:2] / ref
                assert store.media_path(ref).read_bytes() == original.read_bytes()
    finally:
        store.close()


def test_an_unreachable_repo_at_start_leaves_the_app_running_and_never_overwrites_the_repo(tmp_path):
    from huggingface_hub import HfApi

    with __import__("socket").socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = App.build(settings_for(tmp_path / "data"), hub_api=HfApi(endpoint=f"http://127.0.0.1:{port}"))
    assert app.sync.restore_at_start() is None
    app.open_store()
    caption_output(app.store, 1)
    reasons = app.ops.readiness()
    assert any(reason.startswith(f"hub sync: the repo {REPO} could not be read at start") for reason in reasons)
    assert f"**Labels sync:** Sync to {REPO} held back: the repo" in models_panel.summary(app)
    assert not app.sync.sync_now()  # held back: the repo may hold a snapshot this empty store would replace
    # the repo can be read again and holds a snapshot: still held back; it holds none: syncing resumes
    hub = LocalHub(tmp_path / "hub")
    other = FeedbackStore(None, tmp_path / "other")
    record_some(other, 50, 1)
    assert HubSync(settings_for(tmp_path / "other"), lambda: other, hub).sync_now()
    other.close()
    app.sync._api = hub
    before = hub.files(REPO)
    assert not app.sync.sync_now() and hub.files(REPO) == before
    empty_hub = LocalHub(tmp_path / "empty-hub")
    app.sync._api = empty_hub
    assert app.sync.sync_now() and app.sync.held_back is None and not app.ops.readiness()
    assert any(path.startswith("snapshots/") for path in empty_hub.files(REPO))
    assert f"**Labels sync:** Synced to {REPO} every 5 min; last sync: 20" in models_panel.summary(app)
    app.close()


SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from hub_standin import LocalHub
from mmdemo.application import App
from mmdemo.config import Settings
from mmdemo.server import serve

settings = Settings.from_env()
sys.exit(0 if serve(settings, App.build(settings, hub_api=LocalHub(sys.argv[2]))) else 1)
"""


def test_graceful_shutdown_syncs_what_was_recorded(tiny_settings: Settings, tmp_path):
    from gradio_client import Client, handle_file

    data_dir, hub_root = tmp_path / "data", tmp_path / "hub"
    shutil.copytree(tiny_settings.tiny_dir, data_dir / "tiny-models")
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMDEMO_DATA_DIR": str(data_dir), "MMDEMO_DEVICE": "cpu",
           "MMDEMO_PROFILE": "tiny", "MMDEMO_PORT": str(port), "MMDEMO_SYNC_REPO": REPO,
           "MMDEMO_SYNC_EVERY_MINUTES": "60", "MMDEMO_SHUTDOWN_GRACE_S": "30"}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT / "tests"), str(hub_root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the server never got ready"
            time.sleep(0.1)
        client = Client(url, verbose=False, download_files=False)
        _, _, details = client.predict(handle_file(CAT), api_name="/caption")
        client.predict(details["output_id"], thumbs="up", comment="keep me", api_name="/feedback")
        assert not (hub_root / REPO.replace("/", "--")).exists()  # nothing synced yet (every 60 min)
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
        assert server.returncode == 0, stderr
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    store = restored(LocalHub(hub_root), tmp_path / "restored")
    try:
        assert [(record.output_id, record.comment) for record in store.iter_records()] == \
            [(details["output_id"], "keep me")]
    finally:
        store.close()
