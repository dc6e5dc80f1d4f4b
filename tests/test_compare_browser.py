"""Compare mode as a person uses it, in a real browser: two VQA models on one question, a blind vote, the names
revealed; the export holds the preference pair and the Models panel's leaderboard changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser_util import field, fill_text, open_app, open_tab
from playwright.sync_api import Page, expect

from mmdemo.feedback import FeedbackStore, export_dataset
from mmdemo.feedback.comparisons import ComparisonStore

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "cat.jpg"
SLOW = 60_000  # ms: the first call of a model loads it
MODELS = {"tiny-vilt-vqa", "tiny-blip-vqa"}


@pytest.fixture(scope="module")
def compare_app(launch_app, tmp_path_factory):
    """The tiny app with a feedback database of its own (no votes before this test)."""
    database = tmp_path_factory.mktemp("compare-browser") / "feedback.db"
    return launch_app(database_url=f"sqlite:///{database}")


def test_two_models_a_blind_vote_the_names_revealed_the_pair_exported_the_leaderboard_changed(
        page: Page, compare_app, tmp_path: Path):
    app = open_app(page, compare_app.url, height=1400)
    models = open_tab(app, "Models")
    models.get_by_text("Leaderboard (blind votes)").click()
    board = models.locator(".prose.mmdemo-leaderboard")
    choose_task(models, "visual-question-answering")
    expect(board).to_contain_text("No votes on visual-question-answering yet")

    panel = open_tab(app, "Ask")
    panel.locator("input[type=file]").first.set_input_files(str(CAT))
    fill_text(field(panel, "Question"), "what is it?")
    panel.get_by_text("Compare two models (blind vote)").click()
    panel.locator(".mmdemo-compare-button").click()
    vote = panel.locator(".mmdemo-vote-a")
    expect(vote).to_be_visible(timeout=SLOW)
    answers = [field(panel, f"Answer ({side})").input_value() for side in "AB"]
    names = [panel.locator(f".prose.mmdemo-compare-name-{side}") for side in "ab"]
    for name in names:  # blind until the vote
        expect(name).to_have_text("")
    vote.click()
    revealed = panel.locator(".prose.mmdemo-compare-revealed")
    expect(revealed).to_contain_text("Your vote: A is better", timeout=15_000)
    shown = [name.inner_text().strip() for name in names]
    assert set(shown) == MODELS

    compare_app.flush_records()
    with FeedbackStore.from_settings(compare_app.settings) as store:
        [vote_row] = list(ComparisonStore(store).votes("visual-question-answering"))
        summary = export_dataset(store, "visual-question-answering", tmp_path / "out", format="jsonl")
    assert summary.preferences == 1
    [pair] = [json.loads(line) for line in (tmp_path / "out/preferences/train.jsonl").read_text().splitlines()]
    assert (pair["label"], pair["inputs"]["question"]) == ("a", "what is it?")
    assert pair["chosen"]["model_id"] == shown[0] and pair["rejected"]["model_id"] == shown[1]
    assert pair["chosen"]["output"]["answer"] == answers[0] and pair["comparison_id"] == vote_row.comparison_id

    models = open_tab(app, "Models")
    models.get_by_role("button", name="Refresh").last.click()
    expect(board).to_contain_text(shown[0], timeout=15_000)
    table = models.locator("#mmdemo-leaderboard")
    expect(table).to_contain_text("1-0-0")  # the winner: one win, no tie, no loss
    expect(table).to_contain_text("0-0-1")


def choose_task(panel, task: str) -> None:
    """Pick ``task`` in the leaderboard's task dropdown (a gradio dropdown: type, then choose)."""
    box = panel.locator("#mmdemo-leaderboard input").first
    box.click()
    box.fill(task)
    panel.page.get_by_role("option", name=task, exact=True).click()
