"""The task tabs' outputs in a real browser: a stale or failed result is not left standing, Create's seeds
and Interrupt, what Ask, Transcribe and Classify show, and the layout on a phone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_util import field, fill_text, open_app, open_tab, set_number
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SLOW = 60_000  # ms: the first call of a model loads it
SAVED = re.compile(r"Saved #\d+")


@pytest.fixture
def app(page: Page, tiny_app) -> Page:
    return open_app(page, tiny_app.url)


def footer(panel):
    return panel.locator(".prose.mmdemo-footer")


def results(panel):
    return panel.locator(".mmdemo-results")


def upload(panel, path: Path) -> None:
    panel.locator("input[type=file]").first.set_input_files(str(path))


def choose_model(app: Page, panel, model: str) -> None:
    panel.get_by_role("combobox", name="Model").click()
    app.get_by_role("option", name=model, exact=True).click()


def caption_and_rate(app: Page, panel) -> None:
    """Caption the cat and rate it: a result with "Saved #N" beside it."""
    upload(panel, ASSETS / "cat.jpg")
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-blip-caption · cpu", timeout=SLOW)
    panel.get_by_role("button", name="Thumbs up").click()
    expect(panel.get_by_text(SAVED)).to_be_visible()
    expect(results(panel)).not_to_have_class(re.compile("mmdemo-stale"))


# --- 15: no old result beside a new error ------------------------------------------------------------


def test_a_refused_input_clears_the_old_result(app: Page, tmp_path: Path):
    panel = open_tab(app, "Caption")
    caption_and_rate(app, panel)
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"this is not an image at all" * 20)
    upload(panel, unreadable)
    expect(results(panel)).to_have_class(re.compile("mmdemo-stale"))  # the input changed: greyed out
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(panel.get_by_text("not an image we can read")).to_be_visible()
    expect(field(panel, "Caption")).to_have_value("")
    expect(footer(panel)).to_have_text("")
    expect(panel.get_by_text(SAVED)).to_be_hidden()
    expect(panel.get_by_role("button", name="Thumbs up")).to_be_hidden()


def test_a_failed_request_clears_the_old_result(app: Page):
    panel = open_tab(app, "Caption")
    caption_and_rate(app, panel)
    choose_model(app, panel, "broken-caption")
    expect(results(panel)).to_have_class(re.compile("mmdemo-stale"))
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(app.get_by_text("could not be loaded").first).to_be_visible(timeout=SLOW)
    expect(field(panel, "Caption")).to_have_value("")
    expect(panel.get_by_text(SAVED)).to_be_hidden()
    expect(results(panel)).not_to_have_class(re.compile("mmdemo-stale"))
    choose_model(app, panel, "tiny-blip-caption")  # a new result shows as before
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-blip-caption · cpu", timeout=SLOW)
    expect(results(panel)).not_to_have_class(re.compile("mmdemo-stale"))
    expect(panel.get_by_role("button", name="Thumbs up")).to_be_visible()


# --- 16: Create -------------------------------------------------------------------------------------


def create_settings(panel, steps: str, images: str = "1", size: str | None = None) -> None:
    panel.get_by_role("button", name=re.compile("Advanced settings")).click()
    set_number(panel.get_by_label("number input for Denoising steps"), steps)
    set_number(panel.get_by_label("number input for Number of images"), images)
    if size:
        set_number(panel.get_by_label("number input for Width"), size)
        set_number(panel.get_by_label("number input for Height"), size)


def test_create_a_typed_seed_is_used_and_each_image_shows_its_own(app: Page):
    panel = open_tab(app, "Create")
    fill_text(field(panel, "Prompt"), "a red bicycle")
    expect(panel.get_by_label("Random seed")).to_be_checked()
    fill_text(field(panel, "Seed"), "4242")
    expect(panel.get_by_label("Random seed")).not_to_be_checked()  # typing a seed means using it
    create_settings(panel, "2", images="2")
    panel.get_by_role("button", name="Create", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-stable-diffusion · cpu", timeout=SLOW)
    expect(panel.locator("img[alt='seed 4242']")).to_have_count(1)
    expect(panel.locator("img[alt='seed 4243']")).to_have_count(1)  # the second image's own seed
    expect(field(panel, "Seed used")).to_have_value("4242")
    panel.locator("img[alt='seed 4243']").click()  # select the second image: its seed is the one to reuse
    expect(field(panel, "Seed used")).to_have_value("4243")
    panel.get_by_role("button", name="Reuse this seed").click()
    expect(field(panel, "Seed")).to_have_value("4243")


def test_create_interrupt_stops_at_the_next_step(app: Page):
    panel = open_tab(app, "Create")
    fill_text(field(panel, "Prompt"), "a cabin in the snow")
    create_settings(panel, "100", size="512")  # the most steps the slider offers
    panel.get_by_role("button", name="Create", exact=True).click()
    progress = panel.get_by_text(re.compile(r"\d+/100 steps"))
    expect(progress.first).to_be_visible(timeout=SLOW)
    expect(progress).to_have_count(1)  # one progress display, not one per output
    panel.get_by_role("button", name="Interrupt").click()
    message = app.get_by_text(re.compile(r"Interrupted at step \d+/100")).first
    expect(message).to_be_visible(timeout=SLOW)
    step = int(re.search(r"step (\d+)/100", message.inner_text()).group(1))
    assert step < 100
    expect(footer(panel)).to_have_text("")  # no result, and no old one
    expect(panel.locator("img[alt^='seed']")).to_have_count(0)


# --- 17: Ask, Transcribe, Classify ------------------------------------------------------------------


def test_ask_shows_the_answer_once_and_no_empty_scores(app: Page):
    panel = open_tab(app, "Ask")
    upload(panel, ASSETS / "cat.jpg")
    fill_text(field(panel, "Question"), "What animal is this?")
    panel.get_by_role("button", name="Ask", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-vilt-vqa · cpu", timeout=SLOW)
    answer = field(panel, "Answer").input_value()
    top = panel.locator(".confidence-set")
    expect(top).to_have_count(5)
    expect(panel.get_by_test_id("label-output-value")).to_have_count(0)  # no heading repeating the answer
    expect(top.first).to_contain_text(answer)
    choose_model(app, panel, "tiny-blip-vqa")  # generates its answer: no scores
    panel.get_by_role("button", name="Ask", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-blip-vqa · cpu", timeout=SLOW)
    expect(panel.get_by_text("Top answers")).to_be_hidden()


def test_transcribe_segments_only_with_timestamps_and_each_has_an_end(app: Page):
    panel = open_tab(app, "Transcribe")
    upload(panel, ASSETS / "speech.wav")
    expect(panel.get_by_text("Segments")).to_be_hidden()
    panel.get_by_label("Timestamps").check()
    expect(panel.get_by_role("button", name="Segments")).to_be_visible()
    panel.get_by_role("button", name="Transcribe", exact=True).click()
    expect(footer(panel)).to_contain_text("tiny-whisper · cpu", timeout=SLOW)
    last_row = panel.get_by_role("row").last  # the header, then one row per segment
    expect(last_row.get_by_role("gridcell")).to_have_count(3)
    end = last_row.get_by_role("gridcell").nth(1).inner_text().strip()
    assert re.fullmatch(r"\d+(\.\d+)?", end), f"the last segment's end is {end!r}"
    panel.get_by_label("Timestamps").uncheck()
    expect(panel.get_by_role("button", name="Segments")).to_be_hidden()


def test_classify_says_one_label_is_meaningless_and_examples_keep_their_lines(app: Page):
    panel = open_tab(app, "Classify")
    labels = field(panel, "Labels (separated by commas or new lines)")
    fill_text(labels, "cat")
    note = panel.get_by_text("With one label the score is always 100%")
    expect(note).to_be_visible()
    fill_text(labels, "cat, dog")
    expect(note).to_be_hidden()
    example = panel.locator("td").filter(has_text="soup")
    expect(example).to_have_count(1)
    assert example.inner_text().strip().split("\n") == ["coffee", "tea", "soup"]


# --- 19: phones -------------------------------------------------------------------------------------


def open_tab_on_a_phone(page: Page, name: str) -> None:
    """Click the tab ``name``, from the "More tabs" menu where it does not fit the width."""
    tab = page.get_by_role("tab", name=name, exact=True)
    if not tab.is_visible():
        page.get_by_role("button", name="More tabs").click()
        tab = page.get_by_role("button", name=name, exact=True)
    tab.click()


@pytest.mark.parametrize("tab, button", [("Caption", "Caption"), ("Ask", "Ask"), ("Create", "Create"),
                                         ("Classify", "Classify"), ("Transcribe", "Transcribe"),
                                         ("Detect", "Detect")])
def test_on_a_phone_the_inputs_and_button_come_first(page: Page, tiny_app, tab: str, button: str):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(tiny_app.url)
    expect(page.get_by_role("tab", name="Caption", exact=True)).to_be_visible()
    open_tab_on_a_phone(page, tab)
    panel = page.locator(f"#tab-{tab.lower()}")
    run = panel.get_by_role("button", name=button, exact=True)
    expect(run).to_be_visible()
    expect(panel.locator(".prose.mmdemo-note").filter(has_text="Tiny random")).to_be_visible()  # laid out
    page.evaluate("() => window.scrollTo(0, 0)")
    box = run.bounding_box()
    assert box["y"] + box["height"] <= 844, f"the {button} button ends at {box['y'] + box['height']:.0f} px"


def test_on_a_phone_the_models_table_shows_the_state(page: Page, tiny_app):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(tiny_app.url)
    page.get_by_role("button", name="More tabs").click()  # the tabs that do not fit the width
    page.get_by_role("button", name="Models", exact=True).click()
    header = page.locator("#tab-models").get_by_role("columnheader", name="state")
    expect(header).to_be_visible()
    box = header.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
