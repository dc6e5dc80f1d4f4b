"""A fine-tuning job whose process is killed mid-training, resumed from the app: the server keeps answering,
the panel says the job failed and why and offers to resume it, nothing half-written is served, and the
resumed job (a new process) finishes the run."""

from __future__ import annotations

import os
import signal

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from mmdemo.finetune.processes import resume_folder

from test_finetune_app import (  # noqa: F401 - app, admin, feedback, one_thread: that module's fixtures, here too
    BASE,
    FAST,
    admin,
    app,
    client_for,
    feedback,
    new_name,
    one_thread,
    wait_until,
    wait_until_done,
)

EPOCHS = 40  # 2 steps each: long enough to kill it after two epochs, short to finish once resumed


def killed_after_two_epochs(app, admin, name: str) -> dict:
    """A job started through the API and killed (SIGKILL) once two epochs (and their checkpoints) are done."""
    job = admin.predict(name=name, epochs=EPOCHS, **FAST, api_name="/finetune_start")
    training = wait_until(admin, job["job_id"], lambda s: s["state"] == "running" and s["epoch"] >= 3)
    os.kill(training["pid"], signal.SIGKILL)
    died = wait_until_done(admin, job["job_id"])
    assert died["state"] == "failed" and "killed by SIGKILL" in died["message"]
    assert name not in app.registry.catalog and not (app.settings.models_dir / name).exists()
    assert resume_folder(app.settings.models_dir, name).is_dir()
    return died


def finished_as_a_whole_run(app, admin, resumed: dict, name: str) -> None:
    done = wait_until_done(admin, resumed["job_id"])
    assert done["state"] == "succeeded", done
    metrics = done["result"]["metrics"]
    assert metrics["steps"] == 2 * EPOCHS and [e["epoch"] for e in metrics["epochs"]] == list(range(1, EPOCHS + 1))
    assert name in app.registry.catalog and not resume_folder(app.settings.models_dir, name).exists()


def test_a_killed_job_is_resumed_through_the_api_and_finishes(app, admin, feedback):
    name = new_name("resumed")
    died = killed_after_two_epochs(app, admin, name)
    assert died["resumable"] and "**Resume** continues the run" in died["message"]
    caption, _, _ = admin.predict(handle_file(str(feedback.picture)), model=BASE, max_new_tokens=5,
                                  api_name="/caption")
    assert isinstance(caption, str) and caption  # the server kept answering

    with pytest.raises(AppError, match="admin"):
        client_for(app, "bob").predict(died["job_id"], api_name="/finetune_resume")
    resumed = admin.predict(died["job_id"], api_name="/finetune_resume")
    assert resumed["job_id"] != died["job_id"] and resumed["resumes"] == died["job_id"]
    assert resumed["state"] in ("pending", "running") and resumed["name"] == name
    finished_as_a_whole_run(app, admin, resumed, name)
    with pytest.raises(AppError, match="cannot be resumed: only a failed job that left a checkpoint can"):
        admin.predict(resumed["job_id"], api_name="/finetune_resume")


@pytest.mark.browser
def test_the_panel_offers_resume_for_a_killed_job_and_the_click_resumes_it(app, admin, feedback, new_context):
    from browser_util import open_tab, sign_in
    from playwright.sync_api import expect

    name = new_name("clicked")
    killed_after_two_epochs(app, admin, name)
    page = sign_in(new_context, app.url, "alice")
    panel = open_tab(page, "Models")
    panel.get_by_role("button", name="Fine-tune on feedback (admins)").click()
    section = panel.locator("#mmdemo-finetune")
    status = section.locator(".prose.mmdemo-finetune-status")
    expect(status).to_contain_text(f"Fine-tuning {name} failed", timeout=15_000)
    expect(status).to_contain_text("It left a checkpoint: Resume continues the run from there")
    section.get_by_role("button", name="Resume").click()
    expect(section.locator(".prose.mmdemo-finetune-answer")).to_have_text(
        "✓ Resumed: a new job continues from the last checkpoint.", timeout=15_000)
    resumed = admin.predict(api_name="/finetune_status")
    assert resumed["name"] == name and resumed["resumes"]
    finished_as_a_whole_run(app, admin, resumed, name)
    expect(status).to_contain_text(f"{name} is ready", timeout=30_000)
    expect(section.get_by_role("button", name="Resume")).to_be_hidden()
