"""Feedback as a person gives it, in a real browser: correct a caption, see "Saved #N", export from the
Models panel and find the caption in the dataset; rate generated images; correct a zero-shot label (exactly
the labels chosen are saved); the Models panel's actions answer beside their buttons."""

from __future__ import annotations

import re
import uuid
import zipfile
from pathlib import Path

import pytest
from browser_util import field, open_app, open_as_admin, open_tab, set_number
from playwright.sync_api import Page, expect

from mmdemo.feedback import FeedbackStore

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "cat.jpg"
SLOW = 60_000  # ms: the first call of a model loads it
SAVED = re.compile(r"Saved #(\d+)")


@pytest.fixture
def app(page: Page, tiny_app) -> Page:
    return open_app(page, tiny_app.url, height=1000)


@pytest.fixture(scope="module")
def store(tiny_app):
    with FeedbackStore.from_settings(tiny_app.settings) as store:
        yield store


def run(panel, button: str, model: str) -> None:
    panel.get_by_role("button", name=button, exact=True).click()
    expect(panel.locator(".prose.mmdemo-footer")).to_contain_text(model, timeout=SLOW)


def saved_id(panel) -> int:
    """Wait for the status line to say "Saved #N"; N."""
    status = panel.locator(".prose.mmdemo-feedback-status")
    expect(status).to_contain_text(SAVED)
    return int(SAVED.search(status.inner_text()).group(1))


def test_correct_a_caption_then_export_it_from_the_models_panel(app: Page, tiny_app, tmp_path: Path):
    import datasets

    panel = open_tab(app, "Caption")
    panel.locator("input[type=file]").first.set_input_files(str(CAT))
    run(panel, "Caption", "tiny-blip-caption")
    box = field(panel, "Correct caption")
    expect(box).to_have_value(field(panel, "Caption").input_value())  # pre-filled with the model's caption
    box.fill("")
    panel.get_by_role("button", name="Save feedback").click()
    expect(panel.get_by_text("Not saved: The corrected caption is empty")).to_be_visible()  # never silent

    caption = f"a tabby cat looking at the camera {uuid.uuid4().hex[:6]}"
    box.fill(caption)
    panel.get_by_role("button", name="Save feedback").click()
    record_id = saved_id(panel)
    panel.get_by_role("button", name="Thumbs up").click()  # the same record, updated
    expect(panel.locator(".prose.mmdemo-feedback-status")).to_contain_text(f"Saved #{record_id} (updated)")

    open_as_admin(app, tiny_app)  # this person runs the app: the export is for admins
    models = open_tab(app, "Models")
    models.get_by_role("button", name="Export feedback (admins)").click()
    models.get_by_label("Records").click()
    app.get_by_role("option", name="corrected only").click()
    models.get_by_role("button", name="Export", exact=True).click()
    expect(models.get_by_text(re.compile("Exported corrected feedback on image-to-text"))).to_be_visible(timeout=SLOW)
    with app.expect_download() as download:
        models.get_by_test_id("download-link").click()
    archive = tmp_path / "export.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(tmp_path / "export")
    exported = datasets.load_from_disk(str(tmp_path / "export"))
    rows = [row for split in exported.values() for row in split.select_columns(["text", "record_id", "thumbs"])]
    assert {"text": caption, "record_id": record_id, "thumbs": 1} in rows


def test_rate_generated_images_and_choose_one(app: Page, store):
    panel = open_tab(app, "Create")
    field(panel, "Prompt").fill("a lighthouse at dusk")
    panel.get_by_role("button", name=re.compile("Advanced settings")).click()
    for setting in ("Number of images", "Denoising steps"):
        set_number(panel.get_by_label(f"number input for {setting}"), "2")
    run(panel, "Create", "tiny-stable-diffusion")
    panel.locator("fieldset").filter(has_text="Image 1: 1 (bad) to 5 (good)").get_by_label("4").check()
    expect(panel.locator("fieldset").filter(has_text="Image 3")).to_have_count(0)  # two images, two ratings
    panel.locator("fieldset").filter(has_text="Preferred image").get_by_label("Image 2").check()
    panel.get_by_role("button", name="Save feedback").click()
    record = store.get(saved_id(panel))
    assert record.correction == {"image_ratings": [4, None], "preferred": 1} and record.task == "text-to-image"


def choose_labels(panel, labels: list[str]) -> None:
    """Pick ``labels`` in the "Right label(s)" dropdown, one by one, as a person does."""
    box = panel.get_by_label("Right label(s)")
    for label in labels:
        box.click()
        panel.page.get_by_role("option", name=label, exact=True).click()
        expect(panel.locator(".token").filter(has_text=label)).to_have_count(1)


def test_a_zero_shot_correction_saves_exactly_the_labels_chosen(app: Page, store):
    panel = open_tab(app, "Classify")
    panel.locator("input[type=file]").first.set_input_files(str(CAT))
    offered = ["cup of coffee", "cat", "tabby", "dog"]
    field(panel, "Labels (separated by commas or new lines)").fill(", ".join(offered))
    run(panel, "Classify", "tiny-clip")
    top = panel.get_by_test_id("label-output-value").inner_text().strip()
    assert top in offered
    preview = panel.locator(".prose.mmdemo-labels-preview")
    expect(preview).to_contain_text("No label chosen")  # the correction starts empty: nothing picked for you
    expect(panel.locator(".token")).to_have_count(0)
    chosen = [label for label in offered if label != top][1:]  # two labels, never the model's top one
    choose_labels(panel, chosen)
    expect(preview).to_have_text("Will be saved as the right label(s): " + ", ".join(chosen))
    field(panel, "Comment (optional)").fill("two labels, not the top one")
    panel.get_by_role("button", name="Thumbs down").click()
    record = store.get(saved_id(panel))
    assert (record.correction, record.thumbs, record.comment) == (chosen, -1, "two labels, not the top one")


def test_a_typed_zero_shot_label_is_saved_as_typed(app: Page, store):
    panel = open_tab(app, "Classify")
    panel.locator("input[type=file]").first.set_input_files(str(CAT))
    field(panel, "Labels (separated by commas or new lines)").fill("cat, dog, car")
    run(panel, "Classify", "tiny-clip")
    labels = panel.get_by_label("Right label(s)")
    labels.fill("tabby")
    labels.press("Enter")  # a label that was not offered
    expect(panel.locator(".prose.mmdemo-labels-preview")).to_have_text("Will be saved as the right label(s): tabby")
    panel.get_by_role("button", name="Save feedback").click()
    assert store.get(saved_id(panel)).correction == ["tabby"]


def test_models_panel_actions_answer_beside_their_buttons(app: Page, tiny_app):
    open_as_admin(app, tiny_app)
    panel = open_tab(app, "Models")
    panel.get_by_label("Model", exact=True).click()
    app.get_by_role("option", name="broken-caption", exact=True).click()
    panel.get_by_role("button", name="Preload").click()
    expect(panel.locator(".prose.mmdemo-models-message")).to_contain_text("Not loaded:", timeout=SLOW)
    expect(panel.locator(".prose.mmdemo-models-message")).to_contain_text("broken-caption")

    panel.get_by_role("button", name="Export feedback (admins)").click()
    export = panel.locator("#mmdemo-export")
    export.get_by_label("Task").click()
    app.get_by_role("option", name="automatic-speech-recognition").click()
    export.get_by_label("Records").click()
    app.get_by_role("option", name="corrected only").click()
    export.get_by_role("button", name="Export", exact=True).click()
    expect(export.locator(".prose.mmdemo-export-message")).to_contain_text(
        "Not exported: No corrected feedback on automatic-speech-recognition to export")
