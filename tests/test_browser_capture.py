"""Capture in a real browser: record speech with the microphone on the Transcribe tab and take a photo with
the webcam on the Caption tab, as a person would, then find the answer on the page and the captured media
on the server.

Chromium's fake media devices stand in for the hardware: the microphone plays ``assets/speech.wav`` in a
loop and the camera shows ``assets/cat.jpg`` (as a 320x240 Y4M video written here), with permission
granted up front.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from browser_util import field, open_tab
from PIL import Image
from playwright.sync_api import Page, expect

from mmdemo.feedback import FeedbackStore
from mmdemo.media import load_audio

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SPEECH, CAT = ROOT / "assets" / "speech.wav", ROOT / "assets" / "cat.jpg"
CAMERA_SIZE = (320, 240)
SLOW = 60_000  # ms: the first call of a model loads it
SAVED = re.compile(r"Saved #(\d+)")


def write_y4m(image: Path, out: Path, size: tuple[int, int] = CAMERA_SIZE, frames: int = 5) -> Path:
    """A still photo as a short raw YUV 4:2:0 video, the format Chromium's fake camera reads (no ffmpeg)."""
    ycbcr = Image.open(image).convert("RGB").resize(size).convert("YCbCr")
    y, cb, cr = ycbcr.split()
    half = (size[0] // 2, size[1] // 2)
    frame = b"FRAME\n" + y.tobytes() + cb.resize(half).tobytes() + cr.resize(half).tobytes()
    out.write_bytes(f"YUV4MPEG2 W{size[0]} H{size[1]} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return out


@pytest.fixture(scope="module")
def capture_browser(browser_type, browser_type_launch_args, tmp_path_factory):
    """Chromium with a fake microphone (speech.wav, 16-bit PCM) and a fake webcam (the cat photo)."""
    camera = write_y4m(CAT, tmp_path_factory.mktemp("fake-camera") / "cat.y4m")
    args = [*browser_type_launch_args.get("args", []), "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={SPEECH}",
            f"--use-file-for-fake-video-capture={camera}"]
    browser = browser_type.launch(**{**browser_type_launch_args, "args": args})
    yield browser
    browser.close()


@pytest.fixture
def app(capture_browser, tiny_app) -> Page:
    context = capture_browser.new_context(viewport={"width": 1280, "height": 1000})
    context.grant_permissions(["microphone", "camera"])
    page = context.new_page()
    page.goto(tiny_app.url)
    expect(page.get_by_role("tab", name="Caption")).to_be_visible()
    yield page
    context.close()


@pytest.fixture(scope="module")
def store(tiny_app):
    with FeedbackStore.from_settings(tiny_app.settings) as store:
        yield store


def answer_and_feedback(panel, button: str, model: str, store: FeedbackStore):
    """Ask for the answer and check its provenance line; rate it; the feedback record saved against the
    answer's output id (which the details on the page show)."""
    panel.get_by_role("button", name=button, exact=True).click()
    expect(panel.locator(".prose.mmdemo-footer")).to_contain_text(f"{model} · cpu", timeout=SLOW)
    panel.get_by_role("button", name="Thumbs up").click()
    status = panel.locator(".prose.mmdemo-feedback-status")
    expect(status).to_contain_text(SAVED)
    record = store.get(int(SAVED.search(status.inner_text()).group(1)))
    panel.get_by_role("button", name="Details (JSON)").click()
    expect(panel.get_by_text(record.output_id)).to_be_visible()
    return record


def test_record_speech_with_the_microphone_then_transcribe_it(app: Page, store: FeedbackStore):
    panel = open_tab(app, "Transcribe")
    panel.get_by_role("button", name="Record audio").click()  # the microphone source
    panel.get_by_role("button", name="Record", exact=True).click()
    stop = panel.get_by_role("button", name="Stop", exact=True)
    expect(stop).to_be_visible()
    app.wait_for_timeout(2_500)  # speak for a while
    stop.click()
    expect(panel.get_by_role("button", name="Play", exact=True)).to_be_visible()  # the recording, ready to play back

    record = answer_and_feedback(panel, "Transcribe", "tiny-whisper", store)
    transcript = field(panel, "Transcript").input_value().strip()
    assert transcript and record.output.output["text"] == transcript
    assert record.output.model_id == "tiny-whisper" and record.thumbs == 1
    # What reached the server is the browser's recording (not the example file), about as long as we spoke.
    (ref,) = record.output.input_media
    recorded = store.media_path(ref)
    assert recorded.read_bytes() != SPEECH.read_bytes()
    audio = load_audio(recorded, None)
    assert 1.5 <= audio.duration <= 6.0
    assert float(np.sqrt(np.mean(audio.samples**2))) > 0.01  # speech, not silence


def test_take_a_photo_with_the_webcam_then_caption_it(app: Page, store: FeedbackStore):
    panel = open_tab(app, "Caption")
    panel.get_by_role("button", name="Capture from camera").click()  # the webcam source
    panel.get_by_role("button", name="Click to Access Webcam").click()
    capture = panel.get_by_role("button", name="capture photo")
    expect(capture).to_be_visible()
    expect(panel.locator("video")).to_have_js_property("readyState", 4)  # frames are coming in
    capture.click()
    expect(panel.locator("img").first).to_be_visible()  # the photo, in place of the live view

    record = answer_and_feedback(panel, "Caption", "tiny-blip-caption", store)
    caption = field(panel, "Caption").input_value().strip()
    assert caption and record.output.output["text"] == caption
    # What reached the server is a frame of the camera: its size, and the cat photo's colours.
    (ref,) = record.output.input_media
    photo = Image.open(store.media_path(ref)).convert("RGB")
    assert photo.size == CAMERA_SIZE
    expected = np.asarray(Image.open(CAT).convert("RGB").resize(CAMERA_SIZE), dtype=np.float32)
    taken = np.asarray(photo, dtype=np.float32)
    mirrored = taken[:, ::-1]  # gradio mirrors the webcam by default
    assert min(np.abs(taken - expected).mean(), np.abs(mirrored - expected).mean()) < 20
