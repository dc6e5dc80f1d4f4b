"""Fine-tuning from the web app, as admins use it: through the API (gradio_client) and in a real browser.
People's corrections of the tiny captioner, recorded through /caption and /feedback, train a new model
in the background; its progress is polled, and the new model then answers /caption and is offered in
the Caption tab after a reload. Non-admins are refused on the server; a job is a process of its own and
one runs at a time while the others wait in order; a killed job says so; an app restarted follows a running
job; the server never imports the training code; the form's buttons answer beside them."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from mmdemo.auth import add_user, hash_password

USERS = {"alice": "admin", "bob": "annotator"}
BASE = "tiny-blip-caption"
CAPTIONS = ("a red car next to a blue truck", "a dog running on the grass", "a bird on a branch of a tree",
            "a boat on the water at sunset", "a plate of rice and broccoli", "an airplane in a clear blue sky")
DONE = ("succeeded", "failed", "cancelled")
# Quick: 6 examples, batch 3, no validation split: 2 steps per epoch.
FAST = dict(task="image-to-text", base=BASE, lr=1e-3, batch_size=3, val_fraction=0.0, only="corrected")


@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


def isolated_data_dir(root: Path, tiny_data_dir: Path) -> Path:
    """A data directory of its own (database, models/) that shares the session's tiny checkpoints, so that
    the models fine-tuned here never join the catalog of other tests' apps."""
    data = root / "data"
    data.mkdir()
    (data / "tiny-models").symlink_to(tiny_data_dir / "tiny-models", target_is_directory=True)
    return data


@pytest.fixture(scope="module")
def app(launch_app, tiny_data_dir, tmp_path_factory):
    """The tiny app with a login (alice: admin, bob: annotator) and a data directory of its own."""
    root = tmp_path_factory.mktemp("finetune-app")
    for name, role in USERS.items():
        add_user(root / "auth.toml", name, role, hash_password(f"pw-{name}", cost=2**8))
    return launch_app(data_dir=isolated_data_dir(root, tiny_data_dir), auth_file=root / "auth.toml")


def client_for(app, name: str) -> Client:
    return Client(app.url, auth=(name, f"pw-{name}"), verbose=False)


@pytest.fixture(scope="module")
def admin(app) -> Client:
    return client_for(app, "alice")


@pytest.fixture(scope="module")
def feedback(app, admin, tmp_path_factory) -> SimpleNamespace:
    """Six captions of the tiny model, each corrected by the admin through /caption and /feedback."""
    folder = tmp_path_factory.mktemp("pictures")
    saved = []
    for i, correction in enumerate(CAPTIONS):
        path = folder / f"picture-{i}.png"
        image = Image.new("RGB", (24, 24), (40 * i, 255 - 40 * i, (70 * i) % 256))
        image.putpixel((i, i), (255, 255, 255))
        image.save(path)
        _, _, details = admin.predict(handle_file(str(path)), model=BASE, max_new_tokens=5, api_name="/caption")
        message, record_id = admin.predict(details["output_id"], thumbs="down", correction=correction, comment="",
                                           api_name="/feedback")
        assert message.startswith("Saved #")
        saved.append(record_id)
    return SimpleNamespace(records=saved, picture=folder / "picture-0.png")


def wait_until_done(client: Client, job_id: str = "", timeout: float = 180.0) -> dict:
    """Poll /finetune_status until the job (default: the newest) has ended; its last status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name="/finetune_status")
        if status["state"] in DONE:
            return status
        time.sleep(0.2)
    raise AssertionError(f"the job did not end within {timeout} s: {status}")


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- the API -------------------------------------------------------------------------------------------


def test_an_admin_fine_tunes_through_the_api_and_the_new_model_answers(app, admin, feedback):
    name = new_name("blip-api")
    started = admin.predict(name=name, epochs=2, **FAST, api_name="/finetune_start")
    assert started["name"] == name and started["base"] == BASE and started["started_by"] == "alice"
    assert started["state"] in ("pending", "running", "succeeded")  # the training runs in the background

    status = wait_until_done(admin)
    assert status["state"] == "succeeded", status
    assert (status["stage"], status["epoch"], status["epochs"]) == ("done", 2, 2)
    assert status["step"] == status["total_steps"] == 4 and isinstance(status["train_loss"], float)
    result = status["result"]
    assert result["model"] == name and result["in_catalog"] and not result["swapped"]
    saved_to = Path(result["saved_to"])
    assert saved_to == app.settings.models_dir / name and (saved_to / "config.json").is_file()
    assert result["metrics"]["data"]["rows"] == {"train": 6, "validation": 0}
    assert result["metrics"]["steps"] == 4 and result["metrics"]["base"]["id"] == BASE
    assert f"it is in the catalog as '{name}'" in status["message"]

    # served through the app at once: no restart, and the registry holds one copy of each model it loaded
    caption, answered_by, details = admin.predict(handle_file(str(feedback.picture)), model=name,
                                                  max_new_tokens=8, api_name="/caption")
    assert details["model"]["id"] == name and name in answered_by and isinstance(caption, str)
    loaded = [entry["id"] for entry in app.registry.status()["loaded"]]
    assert sorted(loaded) == sorted(set(loaded)) and BASE in loaded and name in loaded
    assert app.registry.catalog.get(name, "image-to-text").kind == "blip"


def test_a_lora_job_through_the_api_is_served_on_the_base_copy(app, admin, feedback):
    name = new_name("blip-lora-api")
    admin.predict(name=name, epochs=1, training="lora", **{**FAST, "lr": 1e-2}, api_name="/finetune_start")
    status = wait_until_done(admin)
    assert status["state"] == "succeeded", status
    saved_to = Path(status["result"]["saved_to"])
    assert (saved_to / "adapter_model.safetensors").is_file() and not (saved_to / "model.safetensors").exists()
    assert json.loads((saved_to / "mmdemo-model.json").read_text())["adapter_of"] == BASE
    assert status["result"]["metrics"]["lora"]["merged"] is False
    caption, _, details = admin.predict(handle_file(str(feedback.picture)), model=name, max_new_tokens=8,
                                        api_name="/caption")
    assert details["model"]["id"] == name and isinstance(caption, str)
    loaded = {entry["id"]: entry for entry in app.registry.status()["loaded"]}
    assert loaded[name]["adapter_of"] == BASE and loaded[name]["memory_bytes"] < loaded[BASE]["memory_bytes"]
    assert [entry["id"] for entry in app.registry.status()["loaded"]].count(BASE) == 1


def test_non_admins_are_refused_on_the_server(app, feedback):
    bob = client_for(app, "bob")
    with pytest.raises(AppError, match="Only admins can fine-tune models"):
        bob.predict(name=new_name("not-bobs"), epochs=1, **FAST, api_name="/finetune_start")
    with pytest.raises(AppError, match="Only admins"):
        bob.predict(api_name="/finetune_status")
    with pytest.raises(AppError, match="Only admins"):
        bob.predict(api_name="/finetune_cancel")
    assert not [p for p in app.settings.models_dir.glob("not-bobs*")]


def test_a_second_job_waits_its_turn_and_a_cancelled_one_publishes_nothing(app, admin, feedback):
    name, second = new_name("long-run"), new_name("second")
    first = admin.predict(name=name, epochs=10_000, **FAST, api_name="/finetune_start")  # runs until cancelled
    assert first["state"] == "running" and first["place"] is None
    waiting = admin.predict(name=second, epochs=1, **FAST, api_name="/finetune_start")
    assert (waiting["state"], waiting["place"], waiting["name"]) == ("pending", 1, second)
    assert "place 1 in the queue" in waiting["message"]
    assert [(job["name"], job["state"], job["place"]) for job in waiting["queue"]] == \
        [(name, "running", None), (second, "pending", 1)]
    with pytest.raises(AppError, match=f"A job is already fine-tuning '{second}'"):
        admin.predict(name=second, epochs=1, **FAST, api_name="/finetune_start")
    assert admin.predict(first["job_id"], api_name="/finetune_status")["place"] is None  # the running one

    cancelling = admin.predict(first["job_id"], api_name="/finetune_cancel")
    assert cancelling["name"] == name and cancelling["cancel_requested"]
    status = wait_until_done(admin, first["job_id"])
    assert status["state"] == "cancelled" and "cancelled" in status["error"] and "nothing was published" in \
        status["message"]
    assert name not in app.registry.catalog and not (app.settings.models_dir / name).exists()

    # the second job ran next, in a process of its own, and its model joined the server's catalog
    done = wait_until_done(admin, waiting["job_id"])
    assert done["state"] == "succeeded", (done["error"], done["log_tail"], done["exit_code"])
    assert done["pid"] not in (None, first["pid"]) and done["result"]["in_catalog"] and second in app.registry.catalog
    assert (app.settings.models_dir / second / "finetune.log").is_file()  # the log is kept with the model
    with pytest.raises(AppError, match="No fine-tuning job is running"):
        admin.predict(api_name="/finetune_cancel")


def test_a_waiting_job_can_be_cancelled_before_it_starts(app, admin, feedback):
    running = admin.predict(name=new_name("long-run"), epochs=10_000, **FAST, api_name="/finetune_start")
    waiting = admin.predict(name=new_name("never"), epochs=1, **FAST, api_name="/finetune_start")
    assert waiting["state"] == "pending"
    dropped = admin.predict(waiting["job_id"], api_name="/finetune_cancel")
    assert dropped["state"] == "cancelled" and dropped["pid"] is None and "before it started" in dropped["error"]
    admin.predict(running["job_id"], api_name="/finetune_cancel")
    assert wait_until_done(admin, running["job_id"])["state"] == "cancelled"
    assert admin.predict(waiting["job_id"], api_name="/finetune_status")["pid"] is None  # it never ran


def wait_until(client: Client, job_id: str, condition, timeout: float = 120.0) -> dict:
    """Poll /finetune_status for ``job_id`` until ``condition(status)``; that status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name="/finetune_status")
        if condition(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout} s: {status}")


def test_a_killed_job_process_is_reported_and_the_server_keeps_answering(app, admin, feedback):
    import os
    import signal

    name = new_name("killed")
    job = admin.predict(name=name, epochs=10_000, **FAST, api_name="/finetune_start")
    training = wait_until(admin, job["job_id"], lambda s: s["state"] == "running" and s["step"] >= 2)
    pid = training["pid"]
    assert pid != os.getpid()  # the job is another process, not a thread of the server
    # niced, its torch threads capped at half the cores (at least 1)
    assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    assert training["process"]["threads"] == max(1, (os.cpu_count() or 2) // 2)
    assert training["eta_seconds"] is not None and training["eta_seconds"] > 0

    os.kill(pid, signal.SIGKILL)
    died = wait_until_done(admin, job["job_id"])
    assert died["state"] == "failed" and died["exit_code"] == -signal.SIGKILL
    assert "killed by SIGKILL" in died["error"] and "killed by SIGKILL" in died["message"]
    assert died["log_tail"] and "Last lines of its log" in died["message"]
    assert name not in app.registry.catalog and not (app.settings.models_dir / name).exists()
    assert not list(app.settings.models_dir.glob(f".{name}.partial-*"))  # no half-written model left
    caption, _, details = admin.predict(handle_file(str(feedback.picture)), model=BASE, max_new_tokens=5,
                                        api_name="/caption")
    assert isinstance(caption, str) and details["model"]["id"] == BASE


def test_an_app_restarted_on_the_same_data_dir_follows_a_running_job(launch_app, app, admin, feedback):
    job = admin.predict(name=new_name("across"), epochs=10_000, **FAST, api_name="/finetune_start")
    before = wait_until(admin, job["job_id"], lambda s: s["state"] == "running" and s["step"] >= 1)
    # the first app goes away (its queue stops following); a new app opens the same data directory
    context = app.demo.mmdemo_context
    context.finetune.close()  # the module's later tests get a queue of their own again
    restarted = launch_app(data_dir=app.settings.data_dir, auth_file=app.settings.auth_file)
    client = client_for(restarted, "alice")
    seen = wait_until(client, "", lambda s: s["job_id"] == job["job_id"] and s["step"] > before["step"])
    assert seen["state"] == "running" and seen["pid"] == before["pid"] and seen["name"] == job["name"]
    client.predict(api_name="/finetune_cancel")  # signals the process the first app started
    final = wait_until_done(client, job["job_id"])
    assert final["state"] == "cancelled" and "nothing was published" in final["message"]


def test_the_server_never_imports_the_training_code(app, feedback, tmp_path):
    """A server in a process of its own queues a job through the app's job control and follows it to the end."""
    import json
    import os
    import shutil
    import sqlite3
    import subprocess
    import sys

    data = tmp_path / "data"
    # a copy of the app's data: the database through SQLite's backup (an open()/close() of the file here
    # would drop the running app's locks on it), the media and tiny checkpoints as files
    shutil.copytree(app.settings.data_dir, data, symlinks=True,
                    ignore=shutil.ignore_patterns("models", "feedback.db*"))
    source, copy = sqlite3.connect(app.settings.data_dir / "feedback.db"), sqlite3.connect(data / "feedback.db")
    source.backup(copy)
    source.close(), copy.close()
    script = f"""
import json, os, sys, time
from mmdemo.config import Settings
from mmdemo.finetune import FinetuneConfig
from mmdemo.application import App
ctx = App.build(Settings(profile="tiny", data_dir={str(data)!r}, device="cpu"))
info = ctx.finetune.start(FinetuneConfig("image-to-text", base={BASE!r}, name="in-process-check", epochs=1, lr=1e-3,
                                     batch_size=3, val_fraction=0.0, only="corrected"), "alice")
while info["state"] not in {DONE!r}:
    time.sleep(0.2)
    info = ctx.finetune.status(info["job_id"])
print(json.dumps({{"state": info["state"], "pid": info["pid"], "server": os.getpid(),
                  "in_catalog": "in-process-check" in ctx.registry.catalog,
                  "imported": [m for m in ("mmdemo.finetune.train", "mmdemo.finetune.jobs", "peft", "accelerate")
                               if m in sys.modules]}}))
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen["state"] == "succeeded" and seen["in_catalog"], (seen, ran.stderr[-3000:])
    assert seen["pid"] not in (None, seen["server"]) and seen["imported"] == []


@pytest.mark.parametrize("changes, message", [
    ({"name": "../escape"}, "is not allowed"),
    ({"name": ""}, "Give the new model a name"),
    ({"name": BASE}, "already a catalog model"),
    ({"base": "tiny-clip"}, "cannot be fine-tuned"),
    ({"base": "no-such-model"}, "Unknown model 'no-such-model'"),
    ({"task": "visual-question-answering", "base": "tiny-vilt-vqa"}, "no corrected feedback on visual-question"),
    ({"epochs": 0}, "number of epochs"),
    ({"lr": -1.0}, "learning rate"),
    ({"training": "half"}, "Unknown training mode 'half'"),
])
def test_bad_requests_get_a_readable_message_and_start_nothing(app, admin, feedback, changes, message):
    before = admin.predict(api_name="/finetune_status")
    arguments = {**FAST, "name": new_name("bad"), "epochs": 1, **changes}
    with pytest.raises(AppError, match=message) as refused:
        admin.predict(**arguments, api_name="/finetune_start")
    assert "Traceback" not in str(refused.value)
    assert admin.predict(api_name="/finetune_status").get("job_id") == before.get("job_id")


def test_a_taken_name_and_no_feedback_are_refused(launch_app, tiny_data_dir, tmp_path, app, admin, feedback):
    taken = new_name("taken")
    admin.predict(name=taken, epochs=1, **FAST, api_name="/finetune_start")
    done = wait_until_done(admin)
    assert done["state"] == "succeeded", (done["error"], done["log_tail"], done["exit_code"])
    with pytest.raises(AppError, match="already a catalog model|already exists"):
        admin.predict(name=taken, epochs=1, **FAST, api_name="/finetune_start")

    # an app with no feedback yet (no login: the admin is whoever opened the admin link)
    empty = launch_app(data_dir=isolated_data_dir(tmp_path, tiny_data_dir))
    client = empty.admin_client()
    assert client.predict(api_name="/finetune_status")["state"] == "idle"
    with pytest.raises(AppError, match="no corrected feedback on image-to-text to train on yet"):
        client.predict(name="first", epochs=1, **FAST, api_name="/finetune_start")
    assert client.predict(api_name="/finetune_status")["state"] == "idle"


def test_the_form_defaults_are_the_run_configuration_defaults():
    from mmdemo.finetune import FinetuneConfig
    from mmdemo.finetune.jobs import _store_export_options
    from mmdemo.finetune.control import TRAINING_MODES
    from mmdemo.ui.finetune_panel import DEFAULTS, TRAINING_CHOICES

    config = FinetuneConfig("image-to-text", base=BASE, name="x")
    assert {k: getattr(config, k) for k in ("epochs", "lr", "batch_size")} == \
        {k: DEFAULTS[k] for k in ("epochs", "lr", "batch_size")}
    assert _store_export_options(config) == {"only": DEFAULTS["only"], "val_fraction": DEFAULTS["val_fraction"]}
    assert TRAINING_MODES[DEFAULTS["training"]] == (config.lora, config.merge)
    assert [mode for _, mode in TRAINING_CHOICES] == list(TRAINING_MODES)


# --- in a browser --------------------------------------------------------------------------------------


@pytest.mark.browser
def test_an_admin_fine_tunes_in_the_browser_and_the_caption_tab_offers_the_new_model(app, feedback, new_context):
    from browser_util import field, fill_text, open_tab, sign_in
    from playwright.sync_api import expect

    page = sign_in(new_context, app.url, "alice")
    panel = open_tab(page, "Models")
    panel.get_by_role("button", name="Fine-tune on feedback (admins)").click()
    section = panel.locator("#mmdemo-finetune")
    expect(section.get_by_text("6 approved feedback record(s)")).to_be_visible()
    expect(section.get_by_label("Base model", exact=True)).to_have_value(BASE)

    name = new_name("blip-web")
    fill_text(field(section, "New model name"), name)  # the accordion has just opened
    for label, value in (("Epochs", "2"), ("Learning rate", "0.001"), ("Batch size", "3"),
                         ("Validation fraction", "0")):
        box = section.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Tab")
    section.get_by_role("button", name="Start fine-tuning").click()
    status = section.locator(".prose.mmdemo-finetune-status")
    expect(status).to_contain_text(f"{name} is ready", timeout=120_000)
    expect(status).to_contain_text("kept epoch 2")
    expect(status).to_contain_text(f"it is in the catalog as '{name}'")
    expect(status).to_contain_text("on 6 training and 0 validation rows: 4 steps")  # batch 3, 2 epochs
    assert client_for(app, "alice").predict(api_name="/finetune_status")["settings"] == \
        {"epochs": 2, "lr": 0.001, "batch_size": 3, "val_fraction": 0.0, "only": "approved", "lora": None,
         "merge": False}

    # a reload: the Caption tab's model list comes from today's catalog
    page.reload()
    caption = open_tab(page, "Caption")
    model = caption.get_by_label("Model", exact=True)
    model.click()
    expect(page.get_by_role("option", name=name, exact=True)).to_be_visible()
    page.get_by_role("option", name=name, exact=True).click()
    expect(model).to_have_value(name)
    expect(caption.get_by_text("fine-tuned on 6 feedback examples")).to_be_visible()


@pytest.mark.browser
def test_the_form_trains_a_lora_adapter_when_asked(app, feedback, new_context):
    from browser_util import field, fill_text, open_tab, set_number, sign_in
    from playwright.sync_api import expect

    page = sign_in(new_context, app.url, "alice")
    panel = open_tab(page, "Models")
    panel.get_by_role("button", name="Fine-tune on feedback (admins)").click()
    section = panel.locator("#mmdemo-finetune")
    expect(section.get_by_text("a LoRA adapter for bases of 500M parameters or more")).to_be_visible()
    name = new_name("blip-web-lora")
    fill_text(field(section, "New model name"), name)
    set_number(section.get_by_label("Epochs", exact=True), "1")
    set_number(section.get_by_label("Batch size", exact=True), "3")
    section.get_by_label("LoRA adapter", exact=True).check()
    section.get_by_role("button", name="Start fine-tuning").click()
    expect(section.locator(".prose.mmdemo-finetune-status")).to_contain_text(f"{name} is ready", timeout=120_000)
    settings = client_for(app, "alice").predict(api_name="/finetune_status")["settings"]
    assert (settings["lora"], settings["merge"]) == (True, False)
    assert (app.settings.models_dir / name / "adapter_model.safetensors").is_file()


@pytest.mark.browser
def test_a_non_admin_sees_the_section_read_only(app, new_context):
    from browser_util import open_tab, sign_in
    from playwright.sync_api import expect

    page = sign_in(new_context, app.url, "bob")
    panel = open_tab(page, "Models")
    panel.get_by_role("button", name="Fine-tune on feedback (admins)").click()
    section = panel.locator("#mmdemo-finetune")
    expect(section.get_by_text("Fine-tuning is for admins. You (bob) can see this form")).to_be_visible()
    expect(section.get_by_role("button", name="Start fine-tuning")).to_be_disabled()
    expect(section.get_by_role("button", name="Cancel")).to_be_disabled()


@pytest.mark.browser
def test_start_and_cancel_answer_beside_the_buttons(app, new_context):
    from browser_util import field, fill_text, open_tab, set_number, sign_in
    from playwright.sync_api import expect

    page = sign_in(new_context, app.url, "alice")
    panel = open_tab(page, "Models")
    panel.get_by_role("button", name="Fine-tune on feedback (admins)").click()
    section = panel.locator("#mmdemo-finetune")
    answer = section.locator(".prose.mmdemo-finetune-answer")
    section.get_by_role("button", name="Cancel").click()  # no job runs
    expect(answer).to_have_text("Nothing to cancel: No fine-tuning job is running.")
    section.get_by_role("button", name="Start fine-tuning").click()  # no name given
    expect(answer).to_have_text("Not started: Give the new model a name: letters, digits, '.', '_' or '-'.")
    fill_text(field(section, "New model name"), new_name("blip-none"))
    set_number(section.get_by_label("Epochs", exact=True), "0")  # out of range: the run's configuration says so
    section.get_by_role("button", name="Start fine-tuning").click()
    expect(answer).to_have_text("Not started: The number of epochs must be a whole number from 1 to 10000, not 0.")
    assert client_for(app, "alice").predict(api_name="/finetune_status")["state"] in ("idle", *DONE)  # none started


@pytest.mark.browser
def test_a_finished_vqa_job_shows_its_before_after_table_and_loss_curve(launch_app, tiny_data_dir, tmp_path,
                                                                        new_context):
    """Issue 10: a VQA model trained from the panel; the panel then shows the base's and the new model's
    VQA accuracy (overall, accepted / corrected apart, with the bias note) and the losses per epoch."""
    import random

    from browser_util import field, fill_text, open_tab, sign_in
    from playwright.sync_api import expect

    from colour_squares import COLOURS, QUESTION, square
    from mmdemo.finetune.evaluate import BIASED_NOTE, before_after

    add_user(tmp_path / "auth.toml", "alice", "admin", hash_password("pw-alice", cost=2**8))
    vqa_app = launch_app(data_dir=isolated_data_dir(tmp_path, tiny_data_dir), auth_file=tmp_path / "auth.toml")
    client = client_for(vqa_app, "alice")
    rng = random.Random(0)
    for colour in COLOURS:  # eight answers corrected: a colour ViLT's answers lack
        path = tmp_path / f"{colour}.png"
        square(colour, rng).save(path)
        details = client.predict(handle_file(str(path)), question=QUESTION, model="tiny-vilt-vqa", api_name="/vqa")[3]
        message, _ = client.predict(details["output_id"], thumbs="down", correction=colour, comment="",
                                    api_name="/feedback")
        assert message.startswith("Saved #")
    vqa_app.flush_records()

    page = sign_in(new_context, vqa_app.url, "alice")
    panel = open_tab(page, "Models")
    panel.get_by_role("button", name="Fine-tune on feedback (admins)").click()
    section = panel.locator("#mmdemo-finetune")
    for label, value in (("Task", "visual-question-answering"), ("Base model", "tiny-vilt-vqa")):
        section.get_by_label(label, exact=True).click()
        page.get_by_role("option", name=value, exact=True).click()
        expect(section.get_by_label(label, exact=True)).to_have_value(value)
    expect(section.get_by_text("8 approved feedback record(s)")).to_be_visible()
    name = new_name("vilt-web")
    fill_text(field(section, "New model name"), name)
    for label, value in (("Epochs", "2"), ("Learning rate", "0.002"), ("Batch size", "4"),
                         ("Validation fraction", "0.25")):
        box = section.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Tab")
    table = section.locator(".mmdemo-finetune-evaluation")
    note = section.locator(".prose.mmdemo-finetune-evaluation-note")
    losses = section.locator(".mmdemo-finetune-losses")
    expect(table).to_be_hidden()  # no job has succeeded yet
    expect(losses).to_be_hidden()
    section.get_by_role("button", name="Start fine-tuning").click()
    expect(section.locator(".prose.mmdemo-finetune-status")).to_contain_text(f"{name} is ready", timeout=120_000)

    # the rows the panel shows are those of the job's metrics (metrics.json, kept with the job in the store)
    status = client.predict(api_name="/finetune_status")
    metrics = status["result"]["metrics"]
    assert metrics["evaluation"]["data"]["kind"] == "validation split" and metrics["evaluation"]["data"]["questions"]
    expected = before_after(metrics, name, "visual-question-answering")
    assert expected["headers"][:2] == ["model", "VQA accuracy"] and "corrected rows" in expected["headers"]
    expect(table).to_be_visible()
    for header in expected["headers"]:
        expect(table.get_by_role("columnheader").filter(has_text=header).first).to_be_visible()
    assert [row[0] for row in expected["rows"]] == ["tiny-vilt-vqa (base)", f"{name} (new)"]
    for row in expected["rows"]:  # the model, then its cells in order
        cells = re.compile(r"\s*".join(map(re.escape, row)))
        expect(table.get_by_role("row").filter(has_text=row[0])).to_have_text(cells)
    expect(note).to_contain_text(expected["source"])
    expect(note).to_contain_text(BIASED_NOTE[:40])
    # the loss curve: drawn (vega), epochs 0 (the base) to 2 for both splits
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["epochs"][-1]["val_loss"] is not None
    expect(losses).to_be_visible()
    expect(losses.locator(".vega-embed canvas, .vega-embed svg").first).to_be_visible(timeout=15_000)
