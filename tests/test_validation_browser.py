"""A refused setting is shown next to its own control, in a real browser: not under the tab's main text.

The app here has a 100,000-pixel image limit, so that a size the sliders allow can be refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_util import fill_text, open_app, open_tab, set_number
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def small_app(launch_app):
    return launch_app(max_image_pixels=100_000)


@pytest.fixture
def app(page: Page, small_app) -> Page:
    return open_app(page, small_app.url)


def textbox(panel, label: str):
    """A textbox by the start of its label (a validation message joins its accessible name)."""
    return panel.get_by_role("textbox", name=re.compile("^" + re.escape(label)))


def message_of(control):
    """The validation message of the component holding ``control`` (its nearest block)."""
    block = control.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' block ')][1]")
    return block.locator("div.validation-error")


def test_create_size_over_the_pixel_limit_is_shown_under_width(app: Page):
    panel = open_tab(app, "Create")
    fill_text(textbox(panel, "Prompt"), "a red bicycle")
    panel.get_by_role("button", name=re.compile("Advanced settings")).click()
    width = panel.get_by_label("number input for Width")
    set_number(width, "512")
    set_number(panel.get_by_label("number input for Height"), "512")
    panel.get_by_role("button", name="Create", exact=True).click()
    expect(message_of(width)).to_contain_text("512x512 is larger than the 100,000-pixel limit")
    expect(message_of(textbox(panel, "Prompt"))).to_have_count(0)


def test_create_long_negative_prompt_is_refused_under_it(app: Page):
    panel = open_tab(app, "Create")
    fill_text(textbox(panel, "Prompt"), "a red bicycle")
    negative = textbox(panel, "Negative prompt (what to avoid)")
    fill_text(negative, "blurry " * 300)
    panel.get_by_role("button", name="Create", exact=True).click()
    expect(message_of(negative)).to_contain_text("The negative prompt is 2,099 characters long; the limit is 2,000.")
    expect(message_of(textbox(panel, "Prompt"))).to_have_count(0)


def test_classify_template_with_other_braces_is_refused_under_it(app: Page):
    panel = open_tab(app, "Classify")
    panel.locator("input[type=file]").first.set_input_files(str(ASSETS / "cat.jpg"))
    labels = textbox(panel, "Labels (separated by commas or new lines)")
    fill_text(labels, "cat, dog")
    panel.get_by_role("button", name=re.compile("Advanced settings")).click()
    template = textbox(panel, "Template ({} is replaced by each label)")
    fill_text(template, "a {} {x}")
    panel.get_by_role("button", name="Classify", exact=True).click()
    expect(message_of(template)).to_contain_text('The template may contain braces only as "{}"')
    expect(message_of(labels)).to_have_count(0)
