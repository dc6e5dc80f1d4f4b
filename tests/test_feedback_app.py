"""Feedback through the app's API, as scripts use it: every result carries an ``output_id``, ``/feedback``
saves against it (one record per output and annotator, under 64 parallel calls too), bad feedback is
refused with a readable message, and admins (only) download the export."""

from __future__ import annotations

import re
import time
import zipfile
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

import mmdemo
from mmdemo.auth import add_user, hash_password
from mmdemo.feedback import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
CAT, SPEECH = ROOT / "assets" / "cat.jpg", ROOT / "assets" / "speech.wav"
CALLS = {
    "/caption": ("image-to-text", dict(image=handle_file(CAT), max_new_tokens=5)),
    "/vqa": ("visual-question-answering", dict(image=handle_file(CAT), question="What is it?")),
    "/text_to_image": ("text-to-image", dict(prompt="a red bicycle", num_images=2, steps=2)),
    "/zero_shot": ("zero-shot-image-classification", dict(image=handle_file(CAT), labels="cat, dog, car")),
    "/transcribe": ("automatic-speech-recognition", dict(audio=handle_file(SPEECH))),
}
OUTPUT_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def app(launch_app, tmp_path_factory):
    """The tiny app with a feedback database of its own (so that counts are exact)."""
    database = tmp_path_factory.mktemp("feedback-db") / "feedback.db"
    return launch_app(database_url=f"sqlite:///{database}")


@pytest.fixture(scope="module")
def store(app):
    """The app's store as another process (``mmdemo export``) sees it."""
    with FeedbackStore.from_settings(app.settings) as store:
        yield store


@pytest.fixture
def client(app) -> Client:
    """A new client: a session, so an anonymous annotator, of its own."""
    return Client(app.url, verbose=False)


def details_of(client: Client, endpoint: str) -> dict:
    return client.predict(**CALLS[endpoint][1], api_name=endpoint)[-1]


# --- every result can be rated -----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(CALLS))
def test_every_endpoint_result_carries_an_output_id_recorded_with_its_provenance(app, client, store, endpoint):
    details = details_of(client, endpoint)
    assert OUTPUT_ID.fullmatch(details["output_id"])
    app.flush_records()  # results are recorded in the background, after the answer
    output = store.get_output(details["output_id"])
    assert output.task == CALLS[endpoint][0] and output.model_id == details["model"]["id"]
    assert output.backend == details["model"]["backend"] and output.app_version == mmdemo.__version__
    assert output.session.startswith("anon-")
    media = output.output_media if endpoint == "/text_to_image" else output.input_media
    assert len(media) == (2 if endpoint == "/text_to_image" else 1)
    assert all(store.media_path(ref).is_file() for ref in media)


def test_a_correction_is_saved_with_everything_a_fine_tuning_job_and_an_auditor_need(client, store):
    caption, _, details = client.predict(handle_file(CAT), prefix="a photo of", max_new_tokens=6, num_beams=2,
                                         api_name="/caption")
    message, record_id = client.predict(details["output_id"], thumbs="down", correction="a grey cat on a sofa",
                                        comment="the cat is grey", api_name="/feedback")
    assert message == f"Saved #{record_id}"
    record = store.get(record_id)
    output = record.output
    assert (record.thumbs, record.correction, record.comment) == (-1, "a grey cat on a sofa", "the cat is grey")
    assert record.annotator.startswith("anon-") and record.annotator == output.session
    assert record.app_version == mmdemo.__version__ and record.created_at is not None
    assert (output.task, output.model_id, output.backend) == ("image-to-text", "tiny-blip-caption",
                                                              details["model"]["backend"])
    assert output.model_revision == details["model"]["revision"]
    assert output.output["text"] == caption and output.inputs == {"prefix": "a photo of"}
    assert output.settings["max_new_tokens"] == 6 and output.settings["num_beams"] == 2
    assert store.media_path(output.input_media[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saving_twice_updates_one_record(client, store):
    output_id = details_of(client, "/vqa")["output_id"]
    first = client.predict(output_id, thumbs="up", api_name="/feedback")
    again = client.predict(output_id, thumbs=-1, correction="a cat", api_name="/feedback")
    assert first == again
    record = store.get(first[1])
    assert (record.thumbs, record.correction) == (-1, "a cat")
    assert [r.id for r in store.iter_records() if r.output_id == output_id] == [first[1]]


def test_structured_corrections_are_taken_as_json_or_text(client, store):
    labels_id = details_of(client, "/zero_shot")["output_id"]
    _, record_id = client.predict(labels_id, correction='["dog", "tabby cat"]', api_name="/feedback")
    assert store.get(record_id).correction == ["dog", "tabby cat"]
    client.predict(labels_id, correction="car, cat", api_name="/feedback")
    assert store.get(record_id).correction == ["car", "cat"]
    images_id = details_of(client, "/text_to_image")["output_id"]
    _, record_id = client.predict(images_id, correction={"image_ratings": [4, None], "preferred": 0},
                                  api_name="/feedback")
    assert store.get(record_id).correction == {"image_ratings": [4, None], "preferred": 0}
    client.predict(images_id, correction='{"image_ratings": [2, 5], "preferred": 1}', api_name="/feedback")
    assert store.get(record_id).correction == {"image_ratings": [2, 5], "preferred": 1}


# --- refusals: readable, and nothing written -------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_id(app) -> str:
    return details_of(Client(app.url, verbose=False), "/caption")["output_id"]


@pytest.mark.parametrize("arguments, message, error", [
    (dict(correction=""), "The corrected caption is empty", AppError),
    (dict(correction="x" * 1_000_000), "the limit is 64 KB", ValidationError),  # refused before queueing
    (dict(thumbs="sideways"), 'thumbs must be "up" or "down"', ValidationError),
    (dict(), "Nothing to save", AppError),
    (dict(comment="y" * 5000), "The comment is 5,000 characters long", ValidationError),
])
def test_bad_feedback_is_refused_and_nothing_is_written(client, store, caption_id, arguments, message, error):
    before = store.count()
    with pytest.raises(error, match=message) as refused:
        client.predict(caption_id, **arguments, api_name="/feedback")
    assert "Traceback" not in str(refused.value) and store.count() == before


def test_bad_text_to_image_correction(client, store):
    images_id = details_of(client, "/text_to_image")["output_id"]
    with pytest.raises(AppError, match="A text-to-image correction is JSON"):
        client.predict(images_id, correction="{5 stars}", api_name="/feedback")
    with pytest.raises(AppError, match="one rating .* for each of the 2 image"):
        client.predict(images_id, correction='{"image_ratings": [5]}', api_name="/feedback")


def test_unknown_and_expired_outputs_are_clear_errors(client, app, store):
    with pytest.raises(AppError, match="Unknown output id '0{32}'"):
        client.predict("0" * 32, thumbs="up", api_name="/feedback")
    with pytest.raises(AppError, match="Unknown output id 'not-an-id'"):
        client.predict("not-an-id", thumbs="up", api_name="/feedback")
    with FeedbackStore.from_settings(app.settings, output_ttl_days=1e-9) as short_lived:  # expires at once
        expired = short_lived.record_result("image-to-text", {"image": str(CAT)}, {"text": "a cat"})
    with pytest.raises(AppError, match=f"Output {expired} expired on"):
        client.predict(expired, thumbs="up", api_name="/feedback")


# --- concurrency -------------------------------------------------------------------------------------------


def test_64_parallel_submissions_make_64_records(client, store, tmp_path):
    # 64 results first, recorded as the app records them (quicker than 64 predictions)
    Image.new("RGB", (32, 32), "orange").save(tmp_path / "small.png")
    result = {"labels": [{"label": "cat", "score": 0.7}, {"label": "dog", "score": 0.3}],
              "model": {"id": "tiny-clip", "revision": None, "backend": "transformers"}}
    request = {"image": str(tmp_path / "small.png"), "labels": "cat, dog", "template": "a photo of a {}."}
    outputs = [store.record_result("zero-shot-image-classification", request, result) for _ in range(64)]
    before = store.count()
    with ThreadPoolExecutor(64) as pool:
        saved = list(pool.map(lambda output_id: client.predict(output_id, thumbs="up", api_name="/feedback"), outputs))
    ids = [record_id for _, record_id in saved]
    assert len(set(ids)) == 64 and all(message == f"Saved #{i}" for message, i in saved)
    assert store.count() == before + 64
    assert sorted(r.output_id for r in store.iter_records() if r.id in set(ids)) == sorted(outputs)


def test_64_parallel_repeats_of_one_output_stay_one_record(client, store):
    output_id = details_of(client, "/caption")["output_id"]
    before = store.count()

    def save(i: int) -> tuple:
        # One client (one session, so one annotator) in 64 threads: gradio_client 2.7 sometimes cancels a call
        # whose stream another thread closed. A client saves again then, as people do; still one record.
        for _ in range(3):
            try:
                return tuple(client.predict(output_id, thumbs=("up", "down")[i % 2], api_name="/feedback"))
            except CancelledError:
                continue
        raise AssertionError("three saves in a row were cancelled")

    with ThreadPoolExecutor(64) as pool:
        saved = list(pool.map(save, range(64)))
    assert len(set(saved)) == 1 and store.count() == before + 1


# --- the admin's export --------------------------------------------------------------------------------


def test_the_admin_downloads_the_export_and_finds_the_correction(app, client, tmp_path):
    import datasets

    output_id = details_of(client, "/caption")["output_id"]
    client.predict(output_id, correction="a cat exported through the app", api_name="/feedback")
    with pytest.raises(AppError, match="Only admins can export feedback. This app has no login: open the admin link"):
        client.predict("image-to-text", "datasets", "corrected", api_name="/export_feedback")
    admin = app.admin_client()  # opened the admin link printed at start-up
    archive, message = admin.predict("image-to-text", "datasets", "corrected", api_name="/export_feedback")
    assert "Exported corrected feedback on image-to-text as datasets" in message
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(tmp_path)
    train_and_validation = datasets.load_from_disk(str(tmp_path))
    rows = [row for split in train_and_validation.values() for row in split.select_columns(["text", "output_id"])]
    assert {"text": "a cat exported through the app", "output_id": output_id} in rows


def test_nothing_to_export_is_a_readable_message(app):
    with pytest.raises(AppError, match="No corrected feedback on automatic-speech-recognition to export"):
        app.admin_client().predict("automatic-speech-recognition", "jsonl", "corrected", api_name="/export_feedback")


def test_a_session_hash_taken_from_someone_else_never_overwrites_their_feedback(app, store):
    """The anonymous annotator comes from a signed cookie the server set, not from the session hash a
    client chooses: a client that reuses another's session hash is another annotator."""
    owner, intruder = Client(app.url, verbose=False), Client(app.url, verbose=False)
    output_id = details_of(owner, "/caption")["output_id"]
    _, record_id = owner.predict(output_id, thumbs="up", correction="the owner's caption", api_name="/feedback")
    intruder.session_hash = owner.session_hash
    _, other_id = intruder.predict(output_id, thumbs="down", correction="vandalised", api_name="/feedback")
    assert other_id != record_id
    record = store.get(record_id)
    assert (record.thumbs, record.correction) == (1, "the owner's caption")
    assert store.get(other_id).annotator != record.annotator


def test_a_client_without_cookies_is_a_new_annotator_each_time(app, store):
    """A script that keeps no cookies cannot be told from anyone else: each call is a visitor of its own."""
    import httpx

    output_id = details_of(Client(app.url, verbose=False), "/caption")["output_id"]
    annotators = set()
    for _ in range(2):
        client = Client(app.url, verbose=False)
        client.cookies.clear()  # as a client that keeps none
        _, record_id = client.predict(output_id, thumbs="up", api_name="/feedback")
        annotators.add(store.get(record_id).annotator)
    assert len(annotators) == 2
    assert "mmdemo-visitor=" in httpx.get(app.url + "config").headers["set-cookie"]


def test_export_choices_are_the_stores():
    from mmdemo.feedback import FORMATS, ONLY_CHOICES
    from mmdemo.ui import models_panel

    assert {value for _, value in models_panel.EXPORT_FORMATS} == set(FORMATS)
    assert {value for _, value in models_panel.EXPORT_ONLY} == set(ONLY_CHOICES)


@pytest.fixture(scope="module")
def login_app(launch_app, tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback-login")
    for name, role in (("alice", "admin"), ("bob", "annotator")):
        add_user(folder / "auth.toml", name, role, hash_password(f"pw-{name}", cost=2**8))
    return launch_app(auth_file=folder / "auth.toml", database_url=f"sqlite:///{folder / 'feedback.db'}")


def test_with_a_login_the_annotator_is_the_user_and_only_admins_export(login_app):
    bob = Client(login_app.url, auth=("bob", "pw-bob"), verbose=False)
    output_id = details_of(bob, "/caption")["output_id"]
    _, record_id = bob.predict(output_id, thumbs="up", api_name="/feedback")
    with FeedbackStore.from_settings(login_app.settings) as store:
        record = store.get(record_id)
    assert record.annotator == "bob" and record.output.session == "bob"
    with pytest.raises(AppError, match=r"Only admins can export feedback \(bob is not an admin\)"):
        bob.predict("image-to-text", "datasets", "all", api_name="/export_feedback")
    alice = Client(login_app.url, auth=("alice", "pw-alice"), verbose=False)
    archive, _ = alice.predict("image-to-text", "jsonl", "approved", api_name="/export_feedback")
    with zipfile.ZipFile(archive) as packed:
        assert "data/train.jsonl" in packed.namelist() or "data/validation.jsonl" in packed.namelist()


def test_an_export_link_works_for_admins_only(login_app):
    import httpx

    alice = Client(login_app.url, auth=("alice", "pw-alice"), verbose=False, download_files=False)
    bob = Client(login_app.url, auth=("bob", "pw-bob"), verbose=False)
    bob.predict(details_of(bob, "/caption")["output_id"], thumbs="up", api_name="/feedback")
    archive, _ = alice.predict("image-to-text", "jsonl", "all", api_name="/export_feedback")
    link = archive["url"]
    assert httpx.get(link, cookies=alice.cookies).status_code == 200
    assert httpx.get(link, cookies=bob.cookies).status_code == 403  # a logged-in annotator who got the link
    assert httpx.get(link).status_code in (401, 403)


# --- a store that fails never fails a prediction ---------------------------------------------------------


def test_without_a_working_store_predictions_still_answer_and_feedback_says_why(tiny_settings, caplog):
    import gradio as gr

    from mmdemo.ui import caption
    from mmdemo.ui.common import AppContext
    from mmdemo.ui.feedback import UNAVAILABLE, feedback_row

    ctx = AppContext.create(tiny_settings.replace(database_url="mysql://nobody@nowhere/feedback"))
    demo = caption.demo(ctx)  # a tab alone has /feedback too
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        text, _, details = client.predict(handle_file(CAT), api_name="/caption")
        assert text and details["output_id"] is None
        with pytest.raises(AppError, match="The feedback store (could not be opened|is unavailable)"):
            client.predict("0" * 32, thumbs="up", api_name="/feedback")
    finally:
        demo.close()
    assert "opening the feedback store failed" in caplog.text
    with gr.Blocks():
        row = feedback_row(ctx, "image-to-text")
    assert UNAVAILABLE in row.fill({"text": "a cat", "output_id": None})  # what the row says under the result


def test_start_up_forgets_expired_results_nobody_rated(tiny_settings, tmp_path):
    from mmdemo.feedback import UnknownOutputError
    from mmdemo.application import App
    from mmdemo.server import tidy_feedback_store_in_background

    settings = tiny_settings.replace(database_url=f"sqlite:///{tmp_path / 'feedback.db'}")
    with FeedbackStore.from_settings(settings, output_ttl_days=1e-9) as short_lived:
        expired = short_lived.record_result("image-to-text", {"image": str(CAT)}, {"text": "a cat"})
    ctx = App.build(settings)
    tidy_feedback_store_in_background(ctx).join(timeout=60)
    with pytest.raises(UnknownOutputError):
        ctx.store.get_output(expired)
    ctx.store.close()


def test_feedback_is_saved_while_the_model_queue_is_full(launch_app):
    """Scripts rate results while others wait for models: /feedback never counts against the model queue."""
    busy = launch_app(max_queue=2, concurrency=1)
    client = Client(busy.url, verbose=False)
    output_id = details_of(client, "/caption")["output_id"]
    slow = dict(prompt="a red bicycle", steps=40, num_images=4)
    jobs = [Client(busy.url, verbose=False).submit(**slow, api_name="/text_to_image") for _ in range(4)]
    deadline = time.monotonic() + 60
    while len(busy.demo._queue) < 2:  # waiting (not running) events
        assert time.monotonic() < deadline, "the model queue never filled"
        time.sleep(0.05)
    with pytest.raises(Exception, match="(?i)queue is full"):  # the model queue is full indeed...
        client.predict(**CALLS["/caption"][1], api_name="/caption")
    message, _ = client.predict(output_id, thumbs="up", api_name="/feedback")  # ...feedback still goes in
    assert message.startswith("Saved #")
    for job in jobs:
        try:
            job.result(timeout=120)
        except Exception:  # noqa: BLE001 - some were refused by the full queue, which is the point
            pass
