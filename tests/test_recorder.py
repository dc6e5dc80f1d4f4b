"""Results are recorded off the request's path: the id comes at once, the write follows on a writer
thread, feedback waits for it, a failed record gives a clear message, and a full backlog records in
the caller's thread (nothing is dropped)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from mmdemo.feedback import FeedbackStore, UnknownOutputError
from mmdemo.feedback.recorder import BackgroundRecorder, OutputNotRecordedError
from mmdemo.tasks import Prediction, task_spec
from mmdemo.tasks.caption import CaptionRequest
from mmdemo.tasks.text_to_image import TextToImageRequest

CAT = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"
RESULT = {"text": "a cat", "model": {"id": "tiny-blip-caption", "revision": None, "backend": "transformers"}}
CAPTIONER = task_spec("image-to-text").tiny_models[0]


def caption(media=str(CAT)) -> Prediction:
    """A captioning prediction as mmdemo.tasks.predict hands it over (the request as the task validated it)."""
    return Prediction("image-to-text", CAPTIONER, CaptionRequest(Image.open(CAT), max_new_tokens=5), media, dict(RESULT))


class GatedStore:
    """A real store whose writes wait until the test opens the gate."""

    def __init__(self, store: FeedbackStore):
        self.store, self.gate, self.calls = store, threading.Event(), 0

    def record_prediction(self, *args, **kwargs):
        self.calls += 1
        assert self.gate.wait(30), "the test never opened the gate"
        return self.store.record_prediction(*args, **kwargs)


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(None, tmp_path / "data") as store:
        yield store


def test_the_id_comes_before_the_write_and_feedback_waits_for_it(store):
    gated = GatedStore(store)
    recorder = BackgroundRecorder(lambda: gated)
    output_id = recorder.record(caption(), session="alice")
    assert recorder.backlog == 1  # answered, not written yet
    with pytest.raises(UnknownOutputError):
        store.get_output(output_id)
    threading.Timer(0.2, gated.gate.set).start()
    recorder.wait(output_id)  # what a feedback save does first
    assert store.get_output(output_id).output["text"] == "a cat"
    saved = store.add_feedback(output_id, annotator="alice", correction="a black cat")
    assert saved.message.startswith("Saved #") and recorder.backlog == 0
    recorder.close()


def test_the_recorded_result_is_the_one_shown_even_if_the_caller_changes_it_later(store):
    gated = GatedStore(store)
    recorder = BackgroundRecorder(lambda: gated)
    image = Image.new("RGB", (8, 8), "red")
    result = {"images": [image], "seed": 3, "warnings": [], "model": RESULT["model"]}
    spec = task_spec("text-to-image")
    request = TextToImageRequest(prompt="a red square", seed=3)
    output_id = recorder.record(Prediction(spec.id, spec.tiny_models[0], request, None, result))
    result["images"] = ["mmdemo-3.png"]  # what the Create tab does after recording
    gated.gate.set()
    recorder.flush()
    assert len(store.get_output(output_id).output_media) == 1
    recorder.close()


def test_a_failed_record_is_a_clear_error_on_feedback_not_on_the_prediction(store):
    recorder = BackgroundRecorder(lambda: store)
    output_id = recorder.record(caption(media=b"not an image"))
    with pytest.raises(OutputNotRecordedError, match="could not be recorded"):
        recorder.wait(output_id)
    recorder.wait("0" * 32)  # never pending, never failed: nothing to wait for
    recorder.close()


def test_a_full_backlog_records_in_the_callers_thread(store):
    gated = GatedStore(store)
    recorder = BackgroundRecorder(lambda: gated, workers=1, max_backlog=2)
    first = [recorder.record(caption()) for _ in range(2)]
    assert recorder.backlog == 2
    third = threading.Thread(target=recorder.record, args=(caption(),))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # waiting in its own thread for the (gated) store: back-pressure
    gated.gate.set()
    third.join(30)
    recorder.flush()
    assert gated.calls == 3 and all(store.get_output(i).output["text"] == "a cat" for i in first)
    recorder.close()
