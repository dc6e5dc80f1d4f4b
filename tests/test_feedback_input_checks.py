"""Text the feedback store keeps is refused alike on SQLite and PostgreSQL when no database keeps it alike
(NUL: PostgreSQL refuses it, SQLite keeps it; an unpaired surrogate: not Unicode text), with a message
naming the field; through the API such input, JSON corrections nested or sized to crash the parser and a
batch size that is no number are refused before queueing (gradio_client: ValidationError)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import ValidationError
from PIL import Image

from mmdemo.errors import InvalidInputError
from mmdemo.feedback import AnnotationQueue, FeedbackStore, InvalidCampaignError, InvalidFeedbackError

MODEL = {"id": "tiny-blip-caption", "revision": None, "backend": "transformers"}
BAD_CHARACTERS = {"nul": ("\x00", "a NUL character"), "surrogate": ("\ud800", "an unpaired surrogate")}


def caption_output(store: FeedbackStore, n: int = 0) -> str:
    return store.record_output("image-to-text", inputs={"image": Image.new("RGB", (8, 8), (n, 40, 90))},
                               output={"text": f"a square {n}", "model": MODEL})


def zero_shot_output(store: FeedbackStore) -> str:
    return store.record_output("zero-shot-image-classification",
                               inputs={"image": Image.new("RGB", (8, 8), "olive"), "labels": "cat, dog"},
                               output={"labels": [{"label": "cat", "score": 0.7}, {"label": "dog", "score": 0.3}]})


# --- the store, on both databases -----------------------------------------------------------------------------


@pytest.fixture
def store(store_on_each_database):
    return store_on_each_database


@pytest.mark.parametrize("kind", list(BAD_CHARACTERS))
def test_nul_and_unpaired_surrogates_are_refused_in_every_text_the_store_keeps(store, kind):
    bad, said = BAD_CHARACTERS[kind]
    caption, labels = caption_output(store), zero_shot_output(store)
    refused_feedback = [
        (caption, {"correction": f"a cat{bad}"}, "corrected caption"),
        (caption, {"thumbs": -1, "comment": f"wrong{bad}"}, "comment"),
        (labels, {"correction": ["cat", f"d{bad}g"]}, "corrected labels"),
        (labels, {"correction": f"cat, d{bad}g"}, "corrected labels"),
    ]
    for output_id, kwargs, field in refused_feedback:
        with pytest.raises(InvalidFeedbackError, match=f"There is {said} .* in the {field} "):
            store.add_feedback(output_id, annotator="alice", **kwargs)
    assert store.count() == 0  # nothing half-written, on either database

    with pytest.raises(InvalidInputError, match=f"There is {said} .* in the question "):
        store.record_output("visual-question-answering",
                            inputs={"image": Image.new("RGB", (8, 8)), "question": f"what{bad}?"},
                            output={"answer": "a square"})
    with pytest.raises(InvalidInputError, match=f"There is {said} .* in the (list of )?labels "):
        store.record_output("zero-shot-image-classification",
                            inputs={"image": Image.new("RGB", (8, 8)), "labels": f"cat, d{bad}g"},
                            output={"labels": [{"label": "cat", "score": 1.0}]})
    queue = AnnotationQueue(store)
    with pytest.raises(InvalidCampaignError, match=f"printable characters|There is {said} .* in the campaign name "):
        queue.create_campaign(f"colours{bad}", "image-to-text")
    with pytest.raises(InvalidCampaignError, match=f"There is {said} .* in the instructions "):
        queue.create_campaign("colours", "image-to-text", instructions=f"Name it{bad}")
    campaign = queue.create_campaign("colours", "image-to-text")
    queue.add_outputs(campaign.id, [caption])
    assert [item.output_id for item in queue.next_batch(campaign.name, "bob", 1)] == [caption]
    with pytest.raises(InvalidFeedbackError, match=f"There is {said} .* in the comment "):
        queue.submit(campaign.name, caption, "bob", comment=f"dark{bad}")

    saved = queue.submit(campaign.name, caption, "bob", correction="a dark square", comment="fine ünïcode ✓ 😀")
    assert (store.get(saved.id).correction, store.get(saved.id).comment) == ("a dark square", "fine ünïcode ✓ 😀")
    assert store.count() == 1


# --- the API: refused before queueing ---------------------------------------------------------------------------


def client_for(login_app, name: str) -> Client:
    return Client(login_app.url, auth=(name, f"pw-{name}"), verbose=False)


@pytest.fixture(autouse=True)
def json_escapes_unpaired_surrogates(monkeypatch):
    """Send text as a browser's JSON.stringify does: an unpaired surrogate as a ``\\ud800`` escape (httpx
    writes UTF-8, which cannot hold one, and would fail before sending)."""
    import json

    import httpx._content

    monkeypatch.setattr(httpx._content, "json_dumps", lambda value, **options: json.dumps(
        value, **{**options, "ensure_ascii": True}))


@pytest.fixture
def campaign(login_store) -> tuple[str, str]:
    output_id = caption_output(login_store, 7)
    queue = AnnotationQueue(login_store)
    created = queue.create_campaign(f"checks-{uuid.uuid4().hex[:6]}", "image-to-text")
    queue.add_outputs(created.id, [output_id])
    return created.name, output_id


@pytest.mark.parametrize("correction, message", [
    ("[" * 100_000 + "]" * 100_000, "is 195 KB; the limit is 64 KB"),  # the parser would recurse 100,000 deep
    ("[" * 5_000 + "]" * 5_000, "nested 5000 levels deep"),
    ('{"image_ratings": [[[[[[[[[[1]]]]]]]]]]}', "nested 11 levels deep"),
    ('["cat", "d\\u0000g"]', None),  # JSON escapes are checked once parsed, by the store: a readable AppError
], ids=["100000-deep", "5000-deep", "11-deep", "escaped-nul"])
def test_feedback_correction_json_is_bounded_before_it_is_parsed(login_app, login_store, correction, message):
    alice = client_for(login_app, "alice")
    output_id = zero_shot_output(login_store)
    if message is None:
        with pytest.raises(Exception, match="There is a NUL character .* in the corrected labels ") as refused:
            alice.predict(output_id, correction=correction, api_name="/feedback")
    else:
        with pytest.raises(ValidationError, match=message) as refused:
            alice.predict(output_id, correction=correction, api_name="/feedback")
    assert "Something went wrong" not in str(refused.value) and "Traceback" not in str(refused.value)
    assert alice.predict(output_id, correction='["dog"]', api_name="/feedback")[0].startswith("Saved #")


@pytest.mark.parametrize("kind", list(BAD_CHARACTERS))
@pytest.mark.parametrize("field", ["correction", "comment"])
def test_feedback_text_no_database_keeps_is_refused_before_queueing(login_app, login_store, kind, field):
    bad, said = BAD_CHARACTERS[kind]
    output_id = caption_output(login_store, 3)
    alice = client_for(login_app, "alice")
    with pytest.raises(ValidationError, match=f"There is {said} .* in the {field} "):
        alice.predict(output_id, thumbs="down", **{field: f"a red{bad} square"}, api_name="/feedback")
    assert all(record.output.id != output_id for record in login_store.iter_records())


def test_annotation_calls_refuse_bad_input_before_queueing(login_app, login_store, campaign):
    name, output_id = campaign
    bob = client_for(login_app, "bob")
    for n, message in (("abc", "batch size must be a number, not 'abc'"), (0, "batch size"), (1000, "batch size"),
                       (2.5, "batch size must be a whole number")):
        with pytest.raises(ValidationError, match=message):
            bob.predict(name, n, api_name="/annotate_batch")
    assert [item["output_id"] for item in bob.predict(name, "1", api_name="/annotate_batch")] == [output_id]
    for kwargs, message in (({"comment": "dark\x00"}, "There is a NUL character .* in the comment "),
                            ({"correction": "a dark\ud800 square"},
                             "There is an unpaired surrogate .* in the correction ")):
        with pytest.raises(ValidationError, match=message):
            bob.predict(name, output_id, **kwargs, api_name="/annotate_submit")
    message, record_id = bob.predict(name, output_id, correction="a dark square", api_name="/annotate_submit")
    assert login_store.get(record_id).correction == "a dark square"


def test_a_question_the_store_could_not_keep_is_refused_before_queueing(login_app):
    """Every result is recorded for feedback: a question with a NUL would run, then fail to be recorded."""
    from gradio_client import handle_file

    cat = str(Path(__file__).resolve().parents[1] / "assets" / "cat.jpg")
    with pytest.raises(ValidationError, match="There is a NUL character .* in the question "):
        client_for(login_app, "alice").predict(handle_file(cat), question="what\x00 is it?", api_name="/vqa")
