"""Helpers the browser tests share."""

from __future__ import annotations

from typing import Callable

from playwright.sync_api import BrowserContext, Page, expect


def open_app(page: Page, url: str, width: int = 1280, height: int = 900) -> Page:
    """``page`` on the app at ``url`` (a desktop-sized window), once its tabs are up."""
    page.set_viewport_size({"width": width, "height": height})
    page.goto(url)
    expect(page.get_by_role("tab", name="Caption")).to_be_visible()
    return page


def open_tab(page: Page, name: str):
    page.get_by_role("tab", name=name).click()
    panel = page.locator(f"#tab-{name.lower()}")
    expect(panel).to_be_visible()
    return panel


def field(panel, label: str):
    """The text area or input of the component labelled exactly ``label``."""
    info = panel.page.get_by_test_id("block-info").get_by_text(label, exact=True)
    return panel.locator("label").filter(has=info).locator("textarea, input").first


def set_number(number, value: str, attempts: int = 5) -> None:
    """Type ``value`` into a slider's number box and commit it with Enter, until the box keeps it (see
    :func:`fill_text`)."""
    _type_until_kept(number, value, attempts, commit="Enter")


def fill_text(box, value: str, attempts: int = 5) -> None:
    """Fill a textbox and check that it keeps the value: a box in an accordion that was just opened can
    still be mounting and put its default back over a value typed that instant (type again, as a person
    would)."""
    _type_until_kept(box, value, attempts)


def _type_until_kept(box, value: str, attempts: int, commit: str | None = None) -> None:
    for _ in range(attempts):
        box.fill(value)
        if commit:
            box.press(commit)
        try:
            expect(box).to_have_value(value, timeout=1500)
            return
        except AssertionError:
            continue
    expect(box).to_have_value(value)


def sign_in(new_context: Callable[..., BrowserContext], url: str, name: str, password: str | None = None) -> Page:
    """A new browser context (cookies: one person) on ``url``, signed in as ``name`` (password ``pw-NAME``
    by default, as the tests' auth files have it). ``new_context`` is pytest-playwright's fixture of that
    name, which closes the context when the test ends: an open page keeps polling the server (the
    fine-tuning panel's timer) and keeps its renderer process alive for the rest of the session."""
    page = new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.goto(url)
    page.get_by_test_id("textbox").fill(name)
    page.get_by_test_id("password").fill(password or f"pw-{name}")
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_role("tab", name="Caption")).to_be_visible()
    return page


def open_as_admin(page: Page, app) -> Page:
    """Open ``app`` (no login file) through its admin link, as a person does with the link ``mmdemo serve``
    prints: the page lands on the app with the admin cookie set."""
    page.goto(app.admin_link)
    expect(page.get_by_role("tab", name="Caption")).to_be_visible()
    return page
