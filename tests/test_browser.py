"""A person's path through each tab in a real browser (Debian's chromium via Playwright), one bad input
per tab, the Models panel, and no request leaving 127.0.0.1.

Set MMDEMO_UPDATE_SCREENSHOT=1 to refresh ``assets/screenshot.png`` (taken by the classify test).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import soundfile as sf
from browser_util import field, open_app, open_as_admin, open_tab, set_number
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
SLOW = 60_000  # ms: the first call of a model loads it (and imports transformers)


@pytest.fixture
def app(page: Page, tiny_app) -> Page:
    return open_app(page, tiny_app.url)


def footer(panel):
    """The 'model · device · time' line under the outputs."""
    return panel.locator(".prose.mmdemo-footer")


def note(panel):
    """The line under the model dropdown."""
    return panel.locator(".prose.mmdemo-note")


def upload(panel, path: Path) -> None:
    panel.locator("input[type=file]").first.set_input_files(str(path))


def test_caption(app: Page):
    panel = open_tab(app, "Caption")
    upload(panel, ASSETS / "cat.jpg")
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-blip-caption · cpu", timeout=SLOW)
    assert field(panel, "Caption").input_value().strip()
    expect(note(panel)).to_contain_text("Loaded on cpu")


def test_caption_without_image_says_what_to_do(app: Page):
    panel = open_tab(app, "Caption")
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(panel.get_by_text("Please add an image")).to_be_visible()


def test_ask(app: Page):
    panel = open_tab(app, "Ask")
    upload(panel, ASSETS / "cat.jpg")
    field(panel, "Question").fill("What animal is this?")
    panel.get_by_role("button", name="Ask", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-vilt-vqa · cpu", timeout=SLOW)
    assert field(panel, "Answer").input_value().strip()
    expect(panel.locator(".confidence-set")).to_have_count(5)  # the top answers with their scores


def test_ask_without_question(app: Page):
    panel = open_tab(app, "Ask")
    upload(panel, ASSETS / "coffee.jpg")
    panel.get_by_role("button", name="Ask", exact=True).click()
    expect(panel.get_by_text("Please enter a question")).to_be_visible()


def test_create_shows_progress_and_the_seed_can_be_reused(app: Page):
    panel = open_tab(app, "Create")
    field(panel, "Prompt").fill("an astronaut riding a horse")
    panel.get_by_role("button", name=re.compile("Advanced settings")).click()
    set_number(panel.get_by_label("number input for Denoising steps"), "100")
    panel.get_by_role("button", name="Create", exact=True).click()
    expect(panel.get_by_text(re.compile(r"\d+/100 steps")).first).to_be_visible(timeout=SLOW)  # per-step progress
    expect(footer(panel)).to_contain_text("tiny-stable-diffusion · cpu", timeout=SLOW)
    expect(panel.locator("img[alt^='seed']").first).to_have_attribute("src", re.compile(r"\.png$"))
    seed_used = field(panel, "Seed used").input_value()
    assert seed_used.isdigit()
    panel.get_by_role("button", name="Reuse this seed").click()
    expect(field(panel, "Seed")).to_have_value(seed_used)
    expect(panel.get_by_label("Random seed")).not_to_be_checked()


def test_create_without_prompt(app: Page):
    panel = open_tab(app, "Create")
    panel.get_by_role("button", name="Create", exact=True).click()
    expect(panel.get_by_text("Please enter a prompt")).to_be_visible()


def test_classify(app: Page, tmp_path: Path):
    panel = open_tab(app, "Classify")
    upload(panel, ASSETS / "cat.jpg")
    field(panel, "Labels (separated by commas or new lines)").fill("cat, dog\ncup of coffee")
    panel.get_by_role("button", name="Classify", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-clip · cpu", timeout=SLOW)
    scores = panel.locator(".confidence-set")  # one bar per label, sorted
    expect(scores).to_have_count(3)
    assert {text.split("\n")[0].strip() for text in scores.all_inner_texts()} == {"cat", "dog", "cup of coffee"}
    app.evaluate("window.scrollTo(0, 0)")
    app.screenshot(path=tmp_path / "screenshot.png")
    if os.environ.get("MMDEMO_UPDATE_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "screenshot.png", ASSETS / "screenshot.png")


def test_classify_without_labels(app: Page):
    panel = open_tab(app, "Classify")
    upload(panel, ASSETS / "cat.jpg")
    panel.get_by_role("button", name="Classify", exact=True).click()
    expect(panel.get_by_text("Please give at least one label")).to_be_visible()


def test_transcribe_with_timestamps(app: Page):
    panel = open_tab(app, "Transcribe")
    upload(panel, ASSETS / "speech.wav")
    panel.get_by_label("Timestamps").check()
    panel.get_by_role("button", name="Transcribe", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-whisper · cpu", timeout=SLOW)
    transcript = field(panel, "Transcript").input_value().strip()
    assert transcript
    expect(panel.locator("table").first).to_contain_text(transcript.split()[0])  # the segments


def test_transcribe_silence(app: Page, tmp_path: Path):
    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    panel = open_tab(app, "Transcribe")
    upload(panel, silent)
    panel.get_by_role("button", name="Transcribe", exact=True).click()
    expect(panel.get_by_text("The audio is silent")).to_be_visible()


def test_models_panel_is_read_only_until_the_admin_link_is_opened(app: Page, tiny_app):
    panel = open_tab(app, "Models")
    expect(panel.get_by_text("Read-only: preload, unload, the feedback export and fine-tuning need an admin"))\
        .to_be_visible()
    panel.get_by_role("button", name="Preload").click()
    expect(app.get_by_text("Only admins can load or unload models").first).to_be_visible()

    open_as_admin(app, tiny_app)
    panel = open_tab(app, "Models")
    expect(panel.get_by_text("You are an admin here")).to_be_visible()
    panel.get_by_label("Model").click()
    app.get_by_role("option", name="tiny-siglip").click()
    panel.get_by_role("button", name="Preload").click()
    expect(panel.get_by_text("tiny-siglip is loaded.")).to_be_visible(timeout=SLOW)
    row = panel.get_by_role("row").filter(has_text="tiny-siglip")
    expect(row).to_contain_text("loaded")
    panel.get_by_role("button", name="Unload").click()
    expect(panel.get_by_text("tiny-siglip is unloaded.")).to_be_visible()
    expect(row).to_contain_text("not loaded")


def test_no_request_leaves_the_machine(page: Page, tiny_app):
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlparse(request.url).hostname or request.url.split(":")[0]))
    page.goto(tiny_app.url)
    for name in ("Caption", "Ask", "Create", "Classify", "Transcribe", "Models"):
        open_tab(page, name)
    panel = open_tab(page, "Classify")
    upload(panel, ASSETS / "coffee.jpg")
    field(panel, "Labels (separated by commas or new lines)").fill("coffee, tea")
    panel.get_by_role("button", name="Classify", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-clip", timeout=SLOW)
    page.get_by_text("Use via API").click()  # the API page too
    page.wait_for_timeout(500)
    assert hosts and hosts <= {"127.0.0.1", "localhost", "data", "blob"}, hosts
