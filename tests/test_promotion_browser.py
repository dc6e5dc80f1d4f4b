"""Promote and roll back in the Models panel, as a person clicks through it: refused next to the button
for a visitor who is not an admin, then, as an admin, the promoted model selected in its tab after a reload
(and answering), its lineage shown, and the rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import open_app, open_as_admin, open_tab
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SLOW = 60_000  # ms: loading a model (and transformers) on a loaded machine
TASK = "zero-shot-image-classification"


@pytest.fixture(scope="module")
def promote_app(launch_app, tmp_path_factory):
    """The tiny app with a feedback database of its own (its promotions stay out of the other tests' app)."""
    folder = tmp_path_factory.mktemp("promote-browser")
    return launch_app(database_url=f"sqlite:///{folder / 'feedback.db'}")


def choose(page: Page, dropdown, option: str) -> None:
    dropdown.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(dropdown).to_have_value(option)


def classify_model(page: Page):
    """The Classify tab's model dropdown, after a fresh page load."""
    return open_tab(page, "Classify").get_by_label("Model", exact=True)


def test_promote_and_roll_back_in_the_models_panel(page: Page, promote_app):
    open_app(page, promote_app.url)
    expect(classify_model(page)).to_have_value("tiny-clip")
    panel = open_tab(page, "Models")
    choose(page, panel.get_by_label("Model", exact=True), "tiny-siglip")
    panel.get_by_role("button", name="Promote", exact=True).click()
    message = panel.locator(".prose.mmdemo-models-message")
    expect(message).to_contain_text("Only admins can promote models")  # checked by the server
    assert promote_app.registry.catalog.promoted(TASK) is None

    open_as_admin(page, promote_app)
    panel = open_tab(page, "Models")
    choose(page, panel.get_by_label("Model", exact=True), "tiny-siglip")
    panel.get_by_role("button", name="Promote", exact=True).click()
    expect(message).to_contain_text(f"tiny-siglip is now the default of {TASK}", timeout=SLOW)
    lineage = panel.locator(".prose.mmdemo-lineage")
    expect(lineage).to_contain_text("Lineage of tiny-siglip")
    expect(lineage).to_contain_text("promoted by")

    page.reload()
    model = classify_model(page)
    expect(model).to_have_value("tiny-siglip")
    tab = page.locator("#tab-classify")
    tab.locator("input[type=file]").first.set_input_files(str(ASSETS / "cat.jpg"))
    tab.get_by_label("Labels (separated by commas or new lines)").fill("cat, dog")
    tab.get_by_role("button", name="Classify", exact=True).click()
    expect(tab.locator(".prose.mmdemo-footer")).to_contain_text("tiny-siglip · cpu", timeout=SLOW)

    panel = open_tab(page, "Models")
    defaults = panel.locator("#mmdemo-defaults")
    defaults.get_by_text("Default models: history and rollback (admins)").click()
    choose(page, defaults.get_by_label("Task", exact=True), TASK)
    expect(defaults.get_by_role("row").filter(has_text="promote")).to_contain_text("tiny-siglip")
    defaults.get_by_role("button", name="Roll back", exact=True).click()
    expect(defaults.locator(".prose.mmdemo-rollback-message")).to_contain_text(
        f"{TASK} is back to its catalog default, tiny-clip", timeout=SLOW)
    expect(defaults.get_by_role("row").filter(has_text="rollback")).to_contain_text("tiny-siglip")

    page.reload()
    expect(classify_model(page)).to_have_value("tiny-clip")
