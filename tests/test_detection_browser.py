"""The Detect tab in a real browser: find boxes, then correct one with the mouse (drag it) and find exactly
that move in the stored correction; the coordinates table follows the editor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_util import field, open_app, open_tab
from playwright.sync_api import Page, expect

from mmdemo.feedback import FeedbackStore

pytestmark = pytest.mark.browser

CAT = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"
SLOW = 60_000  # ms: the first call of a model loads it
SAVED = re.compile(r"Saved #(\d+)")
MOVE = (40, 25)  # screen pixels the box is dragged by


@pytest.fixture(scope="module")
def store(tiny_app):
    with FeedbackStore.from_settings(tiny_app.settings) as store:
        yield store


def image_geometry(canvas, width: int, height: int) -> tuple[float, float, float]:
    """Where the editor draws the image on its canvas: it fits the image in the canvas, centred. Returns the
    screen position of the image's (0, 0) and the screen pixels per image pixel."""
    area = canvas.bounding_box()
    scale = min(area["width"] / width, area["height"] / height)
    left = area["x"] + (area["width"] - width * scale) / 2
    top = area["y"] + (area["height"] - height * scale) / 2
    return left, top, scale


def test_drag_a_box_with_the_mouse_and_save_the_moved_box(page: Page, tiny_app, store):
    app = open_app(page, tiny_app.url, height=1100)
    panel = open_tab(app, "Detect")
    panel.locator("input[type=file]").first.set_input_files(str(CAT))
    field(panel, "What to find (separated by commas or new lines)").fill("cat, remote control")
    panel.get_by_role("button", name="Detect", exact=True).click()
    expect(panel.locator(".prose.mmdemo-footer")).to_contain_text("tiny-owlv2", timeout=SLOW)
    expect(panel.locator(".mmdemo-boxes-drawn img")).to_be_visible()  # the boxes drawn on the image

    editor = panel.locator(".mmdemo-box-editor")
    canvas = editor.locator("canvas")
    canvas.scroll_into_view_if_needed()
    expect(canvas).to_be_visible()
    table = panel.locator(".mmdemo-box-table")  # the correction's coordinates table, under the editor
    expect(table.get_by_test_id("cell-0-0")).not_to_be_empty()
    first_row = [table.get_by_test_id(f"cell-0-{column}").inner_text().strip() for column in range(5)]
    label = first_row[0]
    xmin, ymin, xmax, ymax = (float(v) for v in first_row[1:])

    from PIL import Image

    width, height = Image.open(CAT).size
    editor.get_by_role("button", name="Drag boxes").click()
    left, top, scale = image_geometry(canvas, width, height)
    # The box's centre, dragged towards the middle of the image (the editor keeps boxes inside it).
    start_x, start_y = left + (xmin + xmax) / 2 * scale, top + (ymin + ymax) / 2 * scale
    dx = MOVE[0] if (xmin + xmax) / 2 < width / 2 else -MOVE[0]
    dy = MOVE[1] if (ymin + ymax) / 2 < height / 2 else -MOVE[1]
    app.mouse.move(start_x, start_y)
    app.mouse.down()
    for step in range(1, 11):
        app.mouse.move(start_x + dx * step / 10, start_y + dy * step / 10)
    app.mouse.up()
    moved_xmin = xmin + dx / scale
    # The table follows the editor.
    expect(table.get_by_test_id("cell-0-1")).not_to_have_text(first_row[1])

    panel.get_by_role("button", name="Save feedback").click()
    status = panel.locator(".prose.mmdemo-feedback-status")
    expect(status).to_contain_text(SAVED)
    record = store.get(int(SAVED.search(status.inner_text()).group(1)))
    assert record.task == "zero-shot-object-detection"
    found = record.output.output["boxes"]
    corrected = record.correction
    assert len(corrected) == len(found)  # the other boxes were kept as they were
    changed = [(old, new) for old, new in zip(found, corrected)
               if any(abs(old["box"][c] - new["box"][c]) > 1 for c in new["box"])]
    assert len(changed) == 1, changed
    old, new = changed[0]
    assert new["label"] == old["label"] == label
    tolerance = 2 + 2 / scale  # rounding to whole pixels, on screen and in the image
    assert abs(new["box"]["xmin"] - moved_xmin) <= tolerance
    assert abs(new["box"]["ymin"] - (ymin + dy / scale)) <= tolerance
    assert abs((new["box"]["xmax"] - new["box"]["xmin"]) - (xmax - xmin)) <= tolerance  # moved, not resized


def test_annotate_shows_the_box_editor_on_the_stored_image(login_app, login_store, new_context):
    """Annotate hands the editor the item's image: the annotator drags the model's box and submits."""
    import uuid

    import browser_util
    from PIL import Image

    from mmdemo.feedback import AnnotationQueue

    tag = uuid.uuid4().hex[:6]
    found = {"label": "cat", "score": 0.5, "box": {"xmin": 20.0, "ymin": 20.0, "xmax": 120.0, "ymax": 100.0}}
    output_id = login_store.record_output(
        "zero-shot-object-detection", inputs={"image": Image.new("RGB", (320, 240), (90, 140, 60)), "queries": "cat"},
        output={"boxes": [found], "width": 320, "height": 240, "threshold": 0.1,
                "model": {"id": "tiny-owlv2", "revision": None, "backend": "transformers"}})
    queue = AnnotationQueue(login_store)
    campaign = queue.create_campaign(f"boxes-{tag}", "zero-shot-object-detection", instructions="Box the cat.")
    queue.add_outputs(campaign.id, [output_id])

    page = browser_util.sign_in(new_context, login_app.url, "bob")
    panel = open_tab(page, "Annotate")
    panel.get_by_label("Campaign", exact=True).click()
    page.get_by_role("option", name=campaign.name, exact=True).click()
    panel.get_by_role("button", name="Get a batch").click()
    expect(panel.get_by_text("Box the cat.")).to_be_visible()
    table = panel.locator(".mmdemo-box-table")
    expect(table.get_by_test_id("cell-0-0")).to_have_text("cat")  # the model's box, in the editor's table
    canvas = panel.locator(".mmdemo-box-editor canvas")
    canvas.scroll_into_view_if_needed()
    panel.locator(".mmdemo-box-editor").get_by_role("button", name="Drag boxes").click()
    left, top, scale = image_geometry(canvas, 320, 240)
    start_x, start_y = left + 70 * scale, top + 60 * scale
    page.mouse.move(start_x, start_y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(start_x + 6 * step * scale, start_y + 4 * step * scale)
    page.mouse.up()
    expect(table.get_by_test_id("cell-0-1")).not_to_have_text("20")
    panel.get_by_role("button", name="Submit & next").click()
    status = panel.locator(".prose.mmdemo-annotate-batch")  # the only item: "Item 1: Saved #N. Batch done."
    expect(status).to_contain_text(SAVED)
    record = login_store.get(int(SAVED.search(status.inner_text()).group(1)))
    (box,) = record.correction
    assert box["label"] == "cat"
    assert abs(box["box"]["xmin"] - 80) <= 3 and abs(box["box"]["ymin"] - 60) <= 3  # moved by (60, 40)
    assert abs(box["box"]["xmax"] - box["box"]["xmin"] - 100) <= 2  # moved, not resized
