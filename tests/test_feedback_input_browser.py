"""In a real browser, text the store cannot keep alike on every database is refused beside the feedback row,
not saved on SQLite and lost on PostgreSQL: the status line says which field and the record is unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_util import field, fill_text, open_tab
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "cat.jpg"
SLOW = 60_000  # ms: the first call of a model loads it


def test_a_comment_with_a_nul_character_is_refused_beside_the_row(page: Page, tiny_app):
    page.goto(tiny_app.url)
    panel = open_tab(page, "Caption")
    panel.locator("input[type=file]").first.set_input_files(str(CAT))
    panel.get_by_role("button", name="Caption", exact=True).click()
    expect(panel.locator(".prose.mmdemo-footer")).to_contain_text("tiny-blip-caption", timeout=SLOW)
    comment = field(panel, "Comment (optional)")
    fill_text(comment, "pasted\x00text")
    panel.get_by_role("button", name="Save feedback").click()
    status = panel.locator(".prose.mmdemo-feedback-status")
    expect(status).to_contain_text(re.compile(r"Not saved: There is a NUL character .* in the comment"))
    fill_text(comment, "pasted text")
    panel.get_by_role("button", name="Save feedback").click()
    expect(status).to_contain_text(re.compile(r"Saved #\d+"))
