"""Annotation by script, through the app's API as gradio_client sees it: an annotator leases a batch (its media
downloaded), corrects one item, skips another; the admin reads the progress; others are refused."""

from __future__ import annotations

import uuid

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from mmdemo.feedback import AnnotationQueue

MODEL = {"id": "tiny-blip-caption", "revision": None, "backend": "transformers"}


def client_for(login_app, name: str) -> Client:
    return Client(login_app.url, auth=(name, f"pw-{name}"), verbose=False)


@pytest.fixture
def campaign(login_store) -> tuple[str, list[str]]:
    """A caption campaign of three recorded outputs (24x24 squares of different colours)."""
    tag = uuid.uuid4().hex[:6]
    ids = [login_store.record_output("image-to-text", inputs={"image": Image.new("RGB", (24, 24), (80 * n, 90, 200))},
                                     output={"text": f"square {tag} {n}", "model": MODEL}) for n in range(3)]
    queue = AnnotationQueue(login_store)
    created = queue.create_campaign(f"api-{tag}", "image-to-text", instructions="Name the colour.")
    queue.add_outputs(created.id, ids)
    return created.name, ids


def test_an_annotator_labels_a_batch_by_script_and_the_admin_reads_the_progress(login_app, login_store, campaign):
    name, ids = campaign
    bob = client_for(login_app, "bob")
    items = bob.predict(name, 2, api_name="/annotate_batch")
    assert len(items) == 2 and {item["output_id"] for item in items} <= set(ids)
    first = items[0]
    assert first["task"] == "image-to-text" and first["instructions"] == "Name the colour."
    assert first["suggestion"]["text"].startswith("square ") and first["model"] == "tiny-blip-caption"
    with Image.open(first["input_media"][0]) as downloaded:  # the stored image, downloaded by the client
        assert downloaded.size == (24, 24)

    message, record_id = bob.predict(name, first["output_id"], correction="a purple square",
                                     api_name="/annotate_submit")
    assert message == f"Saved #{record_id}"
    record = login_store.get(record_id)
    assert (record.correction, record.annotator) == ("a purple square", "bob")
    assert bob.predict(name, items[1]["output_id"], api_name="/annotate_skip") == "Skipped."

    carol = client_for(login_app, "carol")  # the skipped item and the third are hers now; bob's labelled one is not
    theirs = {item["output_id"] for item in carol.predict(name, 10, api_name="/annotate_batch")}
    assert theirs == set(ids) - {first["output_id"]}

    progress = client_for(login_app, "alice").predict(name, api_name="/annotate_progress")
    rows = {row["annotator"]: (row["done"], row["skipped"], row["leased"]) for row in progress["annotators"]}
    assert rows == {"bob": (1, 1, 0), "carol": (0, 0, 2)}


def test_refusals_are_readable(login_app, campaign):
    name, ids = campaign
    bob = client_for(login_app, "bob")
    with pytest.raises(AppError, match="Only admins"):
        bob.predict(name, api_name="/annotate_progress")
    with pytest.raises(AppError, match="(?i)campaign"):
        bob.predict("no-such-campaign", 2, api_name="/annotate_batch")
    with pytest.raises(AppError, match="(?i)not .*(yours|batch|leased)"):  # never leased to bob
        bob.predict(name, ids[0], correction="a red square", api_name="/annotate_submit")
