"""The audit log: entries in the store on SQLite and PostgreSQL (written in the same transaction as the store
writes they record), one entry per audited action with its actor from the CLI (the OS user) and from the
app's API (the signed-in admin), `mmdemo audit --json`, and the log refused to non-admins (API and panel)."""

from __future__ import annotations

import getpass
import json
import time
import uuid

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

from mmdemo.auth import add_user, hash_password
from mmdemo.cli import main
from mmdemo.errors import InvalidInputError
from mmdemo.feedback import AnnotationQueue, FeedbackStore, PromotionError, RecordNotFoundError
from mmdemo.feedback import store as store_module
from mmdemo.feedback.audit import AuditLog
from mmdemo.feedback.promotions import PromotionStore
from mmdemo.feedback.store import parse_since

CAPTION = "image-to-text"
BASE = "tiny-blip-caption"
CLIP, SIGLIP = "tiny-clip", "tiny-siglip"
USERS = {"alice": "admin", "bob": "annotator"}


def image(n: int) -> Image.Image:
    picture = Image.new("RGB", (16, 16), (20 * n % 256, 255 - 20 * n % 256, 90))
    picture.putpixel((n % 16, 0), (255, 255, 255))
    return picture


def caption_output(store: FeedbackStore, n: int) -> str:
    return store.record_output(CAPTION, inputs={"image": image(n)},
                               output={"text": f"caption {n}", "model": {"id": BASE}})


def summary(entries) -> list[tuple]:
    return [(entry.actor, entry.action, entry.target) for entry in entries]


# --- the store ------------------------------------------------------------------------------------------


def test_entries_round_trip_newest_first_with_filters(store_on_each_database):
    audit = AuditLog(store_on_each_database)
    audit.record("alice", "preload", BASE, {"device": "cpu"})
    audit.record("bob", "export", CAPTION, {"records": 3, "rows": 2})
    audit.record(None, "unload", BASE)
    entries = audit.entries()
    assert summary(entries) == [(None, "unload", BASE), ("bob", "export", CAPTION), ("alice", "preload", BASE)]
    assert entries[1].details == {"records": 3, "rows": 2} and entries[0].details == {}
    assert entries[0].created_at.tzinfo is not None
    assert entries[1].to_dict()["at"] == entries[1].created_at.isoformat(timespec="seconds")
    assert summary(audit.entries(action="export")) == [("bob", "export", CAPTION)]
    assert summary(audit.entries(actor="alice")) == [("alice", "preload", BASE)]
    assert len(audit.entries(limit=2)) == 2
    assert audit.entries(since=parse_since("2999-01-01")) == []
    assert len(audit.entries(since=parse_since(entries[-1].created_at.date().isoformat()))) == 3
    for bad in (dict(action="drop_tables"), dict(limit=0)):
        with pytest.raises(InvalidInputError):
            audit.entries(**bad)
    with pytest.raises(ValueError):
        audit.record("alice", "nonsense")


def test_store_writes_and_their_entries_commit_or_fail_together(store_on_each_database, monkeypatch):
    store = store_on_each_database
    audit = AuditLog(store)
    output_id = caption_output(store, 1)
    alices = store.add_feedback(output_id, annotator="alice", thumbs=1).id
    bobs = store.add_feedback(output_id, annotator="bob", correction="a red square").id

    store.delete_feedback(alices, actor_role="admin", actor="carol")
    [entry] = audit.entries()
    assert summary([entry]) == [("carol", "delete_feedback", str(alices))]
    assert entry.details == {"feedback_ids": [alices], "output_ids": [], "media_files": 0}
    with pytest.raises(RecordNotFoundError):  # nothing deleted: nothing recorded
        store.delete_feedback(alices, actor_role="admin", actor="carol")
    assert len(audit.entries()) == 1

    def broken(*args, **kwargs):
        raise RuntimeError("the audit log cannot be written")

    monkeypatch.setattr(store_module, "write_entry", broken)
    with pytest.raises(Exception, match="audit log cannot be written"):
        store.delete_output(output_id, actor_role="admin", actor="carol")
    assert store.get(bobs).output.id == output_id  # the deletion was rolled back with its entry
    monkeypatch.undo()

    store.delete_output(output_id, actor_role="admin", actor="carol")
    entry = audit.entries()[0]
    assert summary([entry]) == [("carol", "delete_output", output_id)]
    assert entry.details == {"feedback_ids": [bobs], "output_ids": [output_id], "media_files": 1}

    promotions = PromotionStore(store)
    promotions.promote(CAPTION, "blip-ours", actor="dave")
    with pytest.raises(PromotionError):
        promotions.promote(CAPTION, "blip-ours", actor="dave")
    promotions.rollback(CAPTION, actor="erin")
    assert summary(audit.entries(limit=2)) == [("erin", "rollback", CAPTION), ("dave", "promote", "blip-ours")]
    assert audit.entries(limit=1)[0].details == {"model": None, "previous_model": "blip-ours"}

    queue = AnnotationQueue(store)
    campaign = queue.create_campaign("shelf", CAPTION, created_by="frank")
    caption_output(store, 2)
    assert queue.add_recorded("shelf", actor="frank") == 1
    create, add = reversed(audit.entries(limit=2))
    assert summary([create, add]) == [("frank", "annotate_create", "shelf"), ("frank", "annotate_add", "shelf")]
    assert create.details["campaign_id"] == campaign.id and add.details == {"campaign_id": campaign.id, "added": 1}


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_delete_export_promote_and_campaigns_leave_one_entry_each_by_the_os_user(tiny_settings, tmp_path,
                                                                                     capsys):
    database = f"sqlite:///{tmp_path / 'feedback.db'}"
    common = ["--profile", "tiny", "--data-dir", str(tiny_settings.data_dir), "--device", "cpu",
              "--database-url", database]
    with FeedbackStore(database, tiny_settings.data_dir) as store:
        kept = caption_output(store, 3)
        store.add_feedback(kept, annotator="alice", correction="a green square")
        doomed = store.add_feedback(caption_output(store, 4), annotator="alice", thumbs=1).id

    def entries() -> list[dict]:
        capsys.readouterr()
        assert main(["audit", *common, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    me = getpass.getuser()
    assert entries() == []
    assert main(["delete", *common, "--record", str(doomed)]) == 0
    assert main(["export", *common, "--task", "caption", "--out", str(tmp_path / "out"), "--format", "jsonl"]) == 0
    assert main(["models", "promote", SIGLIP, *common]) == 0
    assert main(["annotate", "create", "cats", *common, "--task", "zero-shot"]) == 0
    logged = entries()
    assert [(e["actor"], e["action"], e["target"]) for e in logged] == [
        (me, "annotate_create", "cats"), (me, "promote", SIGLIP), (me, "export", CAPTION),
        (me, "delete_feedback", str(doomed))]
    assert logged[2]["details"]["records"] == 1 and logged[2]["details"]["format"] == "jsonl"
    assert "a green square" not in json.dumps(logged)  # ids and counts, never what people wrote
    assert main(["models", "rollback", "zero-shot", *common, "--by", "bob"]) == 0
    assert [e["action"] for e in entries()][0] == "rollback"
    assert main(["backup", str(tmp_path / "backups"), *common]) == 0
    backup = entries()[0]
    assert (backup["actor"], backup["action"]) == (me, "backup") and backup["details"]["media_copied"] == 1

    capsys.readouterr()
    assert main(["audit", *common, "--action", "promote", "--actor", me]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and f"promote          {SIGLIP}  by {me}" in lines[0]
    assert main(["audit", *common, "--action", "drop_tables"]) == 2
    assert "Unknown audit action 'drop_tables'" in capsys.readouterr().err
    assert main(["audit", *common, "--since", "2999-01-01"]) == 0
    assert "no audit log entries match" in capsys.readouterr().out


# --- the app -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(launch_app, tiny_data_dir, tmp_path_factory, torch_one_thread):
    """The tiny app with a login (alice: admin, bob: annotator) and a data directory of its own."""
    root = tmp_path_factory.mktemp("audit-app")
    for name, role in USERS.items():
        add_user(root / "auth.toml", name, role, hash_password(f"pw-{name}", cost=2**8))
    data = root / "data"
    data.mkdir()
    (data / "tiny-models").symlink_to(tiny_data_dir / "tiny-models", target_is_directory=True)
    return launch_app(data_dir=data, auth_file=root / "auth.toml")


def client_for(app, name: str) -> Client:
    return Client(app.url, auth=(name, f"pw-{name}"), verbose=False)


def test_admin_actions_through_the_api_each_leave_one_entry_by_the_admin(app, tmp_path):
    alice = client_for(app, "alice")
    for i in range(3):  # corrected captions: something to export and to fine-tune on
        path = tmp_path / f"picture-{i}.png"
        image(i).save(path)
        _, _, details = alice.predict(handle_file(str(path)), model=BASE, max_new_tokens=3, api_name="/caption")
        alice.predict(details["output_id"], thumbs="down", correction=f"a square {i}", comment="", api_name="/feedback")

    def newest() -> tuple:
        [entry] = alice.predict(limit=1, api_name="/audit_log")
        return entry["actor"], entry["action"], entry["target"]

    before = len(alice.predict(api_name="/audit_log"))
    alice.predict(CLIP, api_name="/preload_model")
    assert newest() == ("alice", "preload", CLIP)
    alice.predict(CLIP, api_name="/unload_model")
    assert newest() == ("alice", "unload", CLIP)
    alice.predict(CLIP, api_name="/unload_model")  # not loaded: nothing done, nothing recorded
    alice.predict(CAPTION, "jsonl", "corrected", api_name="/export_feedback")
    assert newest() == ("alice", "export", CAPTION)
    alice.predict(SIGLIP, api_name="/promote")
    assert newest() == ("alice", "promote", SIGLIP)
    alice.predict("zero-shot-image-classification", api_name="/rollback")
    assert newest() == ("alice", "rollback", "zero-shot-image-classification")
    name = f"audited-{uuid.uuid4().hex[:6]}"
    job = alice.predict(task=CAPTION, base=BASE, name=name, epochs=10_000, lr=1e-3, batch_size=3, val_fraction=0.0,
                        only="corrected", api_name="/finetune_start")
    assert newest() == ("alice", "finetune_start", name)
    alice.predict(job["job_id"], api_name="/finetune_cancel")
    entries = alice.predict(api_name="/audit_log")
    assert entries[0]["actor"] == "alice" and entries[0]["action"] == "finetune_cancel"
    assert entries[0]["details"]["job_id"] == job["job_id"]
    assert len(entries) - before == 7  # one per action, none for the unload that did nothing
    assert [e["action"] for e in alice.predict(action="preload", api_name="/audit_log")] == ["preload"]
    wait_until_done(alice, job["job_id"])


def test_an_action_whose_entry_cannot_be_written_says_so_beside_the_button(app, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("the audit log cannot be written")

    monkeypatch.setattr(AuditLog, "record", broken)  # the app runs in this process
    message, _, _ = client_for(app, "alice").predict(CLIP, api_name="/preload_model")
    assert message.startswith(f"{CLIP} is loaded.") and "could not be written to the audit log" in message
    assert any(r.levelname == "ERROR" and "preload" in r.getMessage() for r in caplog.records)


def wait_until_done(client: Client, job_id: str, timeout: float = 120.0) -> None:
    """Let the cancelled job's process end before the app closes."""
    deadline = time.monotonic() + timeout
    while client.predict(job_id, api_name="/finetune_status")["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the cancelled job did not end"
        time.sleep(0.2)


def test_the_audit_log_is_refused_to_non_admins_and_bad_filters_before_queueing(app, tiny_app):
    with pytest.raises(AppError, match=r"Only admins can read the audit log \(bob is not an admin\)"):
        client_for(app, "bob").predict(api_name="/audit_log")
    with pytest.raises(AppError, match="Only admins can read the audit log. This app has no login"):
        Client(tiny_app.url, verbose=False).predict(api_name="/audit_log")  # a visitor without the admin link
    alice = client_for(app, "alice")
    with pytest.raises(ValidationError, match="Unknown audit action"):
        alice.predict(action="drop_tables", api_name="/audit_log")
    with pytest.raises(ValidationError, match="not a date"):
        alice.predict(since="yesterday", api_name="/audit_log")
    with pytest.raises(ValidationError, match="from 1 to 10000"):
        alice.predict(limit=0, api_name="/audit_log")


@pytest.mark.browser
def test_the_panel_shows_the_log_to_admins_and_refuses_others_beside_the_button(app, new_context):
    from browser_util import open_tab, sign_in
    from playwright.sync_api import expect

    marker = f"model-{uuid.uuid4().hex[:8]}"  # the newest entry, shown to alice only
    AuditLog(app.demo.mmdemo_context.store).record("alice", "preload", marker)
    for name in ("bob", "alice"):
        panel = open_tab(sign_in(new_context, app.url, name), "Models")
        accordion = panel.locator("#mmdemo-audit")
        accordion.get_by_text("Audit log (admins)").click()
        accordion.get_by_role("button", name="Show", exact=True).click()
        message = accordion.locator(".prose.mmdemo-audit-message")
        if name == "bob":
            expect(message).to_contain_text("Only admins can read the audit log", timeout=15_000)
            expect(accordion).not_to_contain_text(marker)
        else:
            expect(message).to_contain_text("entries.", timeout=15_000)
            expect(accordion).to_contain_text(marker, timeout=15_000)


def test_an_audit_entry_that_cannot_be_written_is_logged_as_an_error(tmp_path, caplog):
    from mmdemo.feedback.audit import record_after

    def no_store() -> FeedbackStore:
        raise RuntimeError("the store is down")

    assert record_after(no_store, "alice", "preload", BASE) is False
    assert any(r.levelname == "ERROR" and "preload" in r.getMessage() for r in caplog.records)
    with FeedbackStore(None, tmp_path / "data") as store:
        assert record_after(lambda: store, "alice", "preload", BASE) is True
        assert summary(AuditLog(store).entries()) == [("alice", "preload", BASE)]
