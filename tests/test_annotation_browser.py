"""Annotation mode as people use it, in a real browser: an admin creates a campaign from recorded outputs,
two annotators signed in from two browsers get disjoint batches, one corrects a caption and skips an item,
the admin sees the progress per annotator, and the export holds the correction. Someone without the
annotator role is told what to do."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import browser_util
import pytest
from browser_util import field, fill_text, open_as_admin, open_tab, set_number
from playwright.sync_api import Page, expect

from mmdemo.feedback import AnnotationQueue, export_dataset

pytestmark = pytest.mark.browser

MODEL = {"id": "tiny-blip-caption", "revision": None, "backend": "transformers"}
SAVED = re.compile(r"Saved #(\d+)")


def image(n: int):
    from PIL import Image

    return Image.new("RGB", (24, 24), (40 * n % 256, 90, 200 - 30 * n % 200))


def sign_in(new_context, url: str, name: str) -> Page:
    """A browser context of its own (cookies: one person), signed in as ``name``, on the Annotate tab
    (closed when the test ends: see :func:`browser_util.sign_in`)."""
    page = browser_util.sign_in(new_context, url, name)
    open_tab(page, "Annotate")
    expect(page.locator("#tab-annotate").get_by_text(f"Signed in as {name}")).to_be_visible()
    return page


def choose(panel, label: str, option: str) -> None:
    panel.get_by_label(label, exact=True).click()
    panel.page.get_by_role("option", name=option, exact=True).click()


def suggestion(panel) -> str:
    return panel.locator(".prose.mmdemo-annotate-suggestion").inner_text()


def test_two_annotators_get_disjoint_batches_correct_and_the_admin_sees_progress(login_app, login_store,
                                                                                   new_context,
                                                                                   tmp_path: Path):
    import datasets

    tag = uuid.uuid4().hex[:6]
    captions = [f"caption {tag} {n}" for n in range(4)]
    for n, text in enumerate(captions):
        login_store.record_output("image-to-text", inputs={"image": image(n)}, output={"text": text, "model": MODEL})
    name = f"captions-{tag}"

    # 1. the admin creates the campaign from the recorded outputs
    alice = sign_in(new_context, login_app.url, "alice")
    admin = alice.locator("#tab-annotate")
    admin.get_by_role("button", name="Campaigns and progress (admins)").click()
    fill_text(field(admin, "Campaign name"), name)  # the accordion has just opened: checked, refilled if lost
    fill_text(field(admin, "Instructions for annotators"), "Describe the colour of the square.")
    admin.get_by_role("button", name="Create campaign from recorded outputs").click()
    created = admin.locator(".prose.mmdemo-annotate-admin")
    expect(created).to_contain_text(f"Created {name} (image-to-text) with 4 item(s)", timeout=30_000)

    # 2. two annotators, two browsers, a batch of two each: no item in both
    batches = {}
    pages = {}
    for who in ("bob", "carol"):
        page = pages[who] = sign_in(new_context, login_app.url, who)
        panel = page.locator("#tab-annotate")
        choose(panel, "Campaign", name)
        set_number(field(panel, "Batch size"), "2")  # retyped until it sticks (a fill can be lost on mount)
        panel.get_by_role("button", name="Get a batch").click()
        expect(panel.locator(".prose.mmdemo-annotate-position")).to_contain_text(f"Item 1 of 2 · {name}")
        expect(panel.get_by_text("Describe the colour of the square.")).to_be_visible()
        batches[who] = suggestion(panel)
    shown = {who: next(c for c in captions if c in text) for who, text in batches.items()}
    assert shown["bob"] != shown["carol"]
    held = {w.annotator: w.leased for w in AnnotationQueue(login_store).progress(name).annotators}
    assert held == {"bob": 2, "carol": 2}

    # 3. bob empties the caption (told what to do, in this tab's terms: it has no thumbs), corrects his
    #    first item (pre-filled with the suggestion), then skips the second
    bob = pages["bob"].locator("#tab-annotate")
    status = bob.locator(".prose.mmdemo-annotate-status")
    box = field(bob, "Correct caption")
    expect(box).to_have_value(shown["bob"])
    box.fill("")
    bob.get_by_role("button", name="Submit & next").click()
    expect(status).to_contain_text("Not saved: The corrected caption is empty")
    expect(bob).not_to_contain_text(re.compile("thumbs", re.IGNORECASE))
    correction = f"a blue square {tag}"
    box.fill(correction)
    bob.get_by_role("button", name="Submit & next").click()
    expect(bob.locator(".prose.mmdemo-annotate-position")).to_contain_text("Item 2 of 2")
    expect(status).to_contain_text(re.compile(r"Item 1: Saved #\d+"))  # under item 2, it names item 1
    record_id = int(SAVED.search(status.inner_text()).group(1))
    bob.get_by_role("button", name="Skip").click()
    expect(bob.get_by_text("Batch done")).to_be_visible()
    expect(bob.locator(".prose.mmdemo-annotate-batch")).to_contain_text("Item 2: skipped. Batch done.")
    record = login_store.get(record_id)
    assert (record.annotator, record.correction, record.output.output["text"]) == ("bob", correction, shown["bob"])

    # 4. the admin sees the progress, per annotator
    choose(admin, "Campaign", name)
    admin.get_by_role("button", name="Show progress of the campaign above").click()
    expect(admin.locator(".prose.mmdemo-annotate-progress")).to_contain_text("1/4 labels")
    table = admin.locator(".mmdemo-annotate-table")
    for row in (["bob", "1", "1", "0"], ["carol", "0", "0", "2"]):
        shown = table.get_by_role("row").filter(has_text=row[0])
        expect(shown).to_have_count(1)
        assert shown.inner_text().split()[:4] == row  # annotator, done, skipped, held now
    rows = {w.annotator: (w.done, w.skipped, w.leased) for w in AnnotationQueue(login_store).progress(name).annotators}
    assert rows == {"bob": (1, 1, 0), "carol": (0, 0, 2)}

    # 5. the export holds bob's correction
    export_dataset(login_store, "image-to-text", tmp_path / "export", only="corrected", val_fraction=0.0)
    exported = datasets.load_from_disk(str(tmp_path / "export"))["train"]
    assert {"text": correction, "record_id": record_id, "annotator": "bob"} in \
        exported.select_columns(["text", "record_id", "annotator"]).to_list()


def test_a_person_without_the_annotator_role_is_told_what_to_do(launch_app, page: Page, tmp_path: Path):
    app = launch_app(host="0.0.0.0", database_url=f"sqlite:///{tmp_path / 'feedback.db'}")  # no login, reachable
    page.goto(app.url.replace("0.0.0.0", "127.0.0.1"))
    panel = open_tab(page, "Annotate")
    expect(panel.get_by_text("Annotation is for annotators.")).to_be_visible()
    panel.get_by_role("button", name="Get a batch").click()  # answered beside the button
    expect(panel.locator(".prose.mmdemo-annotate-batch")).to_contain_text(
        "Not allowed: Annotation is for annotators. Sign in with an account whose role is annotator")


def test_an_annotate_zero_shot_correction_saves_exactly_the_labels_chosen(login_app, login_store, new_context):
    offered = ["cup of coffee", "cat", "tabby", "dog"]  # the model put "cup of coffee" first
    scores = [0.7, 0.15, 0.1, 0.05]
    output_id = login_store.record_output(
        "zero-shot-image-classification", inputs={"image": image(7), "labels": offered},
        output={"labels": [{"label": label, "score": score} for label, score in zip(offered, scores)],
                "model": {"id": "tiny-clip", "revision": None, "backend": "transformers"}})
    name = f"labels-{uuid.uuid4().hex[:6]}"
    queue = AnnotationQueue(login_store)
    queue.add_outputs(queue.create_campaign(name, "zero-shot-image-classification").id, [output_id])

    bob = sign_in(new_context, login_app.url, "bob").locator("#tab-annotate")
    choose(bob, "Campaign", name)
    bob.get_by_role("button", name="Get a batch").click()
    expect(bob.locator(".prose.mmdemo-annotate-position")).to_contain_text(f"Item 1 of 1 · {name}")
    preview = bob.locator(".prose.mmdemo-labels-preview").filter(visible=True)
    expect(preview).to_contain_text("No label chosen")  # starts empty, not with the model's top label
    labels = bob.get_by_label("Right label(s)").filter(visible=True)
    for label in ("cat", "tabby"):
        labels.click()
        bob.page.get_by_role("option", name=label, exact=True).click()
        expect(bob.locator(".token").filter(has_text=label)).to_have_count(1)
    expect(preview).to_have_text("Will be saved as the right label(s): cat, tabby")
    bob.get_by_role("button", name="Submit & next").click()
    done = bob.locator(".prose.mmdemo-annotate-batch")
    expect(done).to_contain_text(re.compile(r"Item 1: Saved #\d+\. Batch done"))
    record = login_store.get(int(SAVED.search(done.inner_text()).group(1)))
    assert (record.output_id, record.correction, record.annotator) == (output_id, ["cat", "tabby"], "bob")


def test_every_annotate_action_answers_beside_its_button(launch_app, page: Page, tmp_path: Path):
    # No login: the browser that opened the admin link may annotate and create campaigns.
    app = launch_app(database_url=f"sqlite:///{tmp_path / 'feedback.db'}")
    open_as_admin(page, app)
    panel = open_tab(page, "Annotate")
    intro = panel.locator(".prose.mmdemo-annotate-intro")
    expect(intro).to_contain_text(re.compile(r"Not signed in: your labels are saved as anon-[0-9a-f]+"))
    expect(intro).not_to_contain_text("Signed in as")

    panel.get_by_role("button", name="Get a batch").click()  # no campaign chosen
    expect(panel.locator(".prose.mmdemo-annotate-batch")).to_have_text("No campaign: Choose a campaign first.")

    panel.get_by_role("button", name="Campaigns and progress (admins)").click()
    panel.get_by_role("button", name="Show progress of the campaign above").click()
    expect(panel.locator(".prose.mmdemo-annotate-progress")).to_have_text("No campaign: Choose a campaign first.")
    created = panel.locator(".prose.mmdemo-annotate-admin")
    create = panel.get_by_role("button", name="Create campaign from recorded outputs")
    create.click()  # no name
    expect(created).to_have_text("Not created: A campaign needs a name: 1 to 200 printable characters.")
    fill_text(field(panel, "Campaign name"), "empty one")
    since = field(panel, "Recorded since (YYYY-MM-DD, optional)")
    fill_text(since, "last week")
    create.click()  # a bad date: refused before the campaign exists
    expect(created).to_have_text("Not created: 'last week' is not a date; use YYYY-MM-DD or an ISO date and time.")
    fill_text(since, "")
    create.click()  # nothing recorded yet: a campaign without items, said so
    expect(created).to_contain_text("Created empty one (image-to-text), but it has no items")
    create.click()  # the same name again
    expect(created).to_have_text("Not created: There is already a campaign named 'empty one'; choose another name.")
    fill_text(field(panel, "Campaign name"), "zero labels")
    set_number(field(panel, "Labels per item"), "0")  # out of range: refused by the queue, with its message
    create.click()
    expect(created).to_have_text("Not created: Labels per item must be a whole number from 1 to 20, not 0.")

    choose(panel, "Campaign", "empty one")
    set_number(field(panel, "Batch size"), "0")
    panel.get_by_role("button", name="Get a batch").click()
    expect(panel.locator(".prose.mmdemo-annotate-batch")).to_have_text("Not done: The batch size must be between 1 and 100; got 0.")
