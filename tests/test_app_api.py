"""The app as API users see it: the tiny-profile app launched once, every endpoint called with
gradio_client, good and bad inputs, batching, the shared queue, lazy start-up, ``python app.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CAT, COFFEE, SPEECH = ASSETS / "cat.jpg", ASSETS / "coffee.jpg", ASSETS / "speech.wav"
ENDPOINTS = {
    "/caption": ["image", "prefix", "model", "max_new_tokens", "num_beams", "do_sample", "temperature", "top_p"],
    "/vqa": ["image", "question", "model", "top_k", "max_new_tokens"],
    "/text_to_image": ["prompt", "negative_prompt", "model", "steps", "guidance", "width", "height", "num_images",
                       "seed", "randomize_seed"],
    "/zero_shot": ["image", "labels", "model", "template", "multi_label"],
    "/transcribe": ["audio", "model", "language", "translate", "timestamps"],
}


@pytest.fixture(scope="module")
def client(tiny_app) -> Client:
    return Client(tiny_app.url, verbose=False)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-media")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg " * 20)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(CAT.read_bytes()[:2000])
    silent = folder / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    empty = folder / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    return {"corrupt": corrupt, "truncated": truncated, "silent": silent, "empty": empty}


def assert_provenance(answered_by: str, details: dict, model_id: str) -> None:
    assert model_id in answered_by and "cpu" in answered_by and ("ms" in answered_by or " s" in answered_by)
    assert details["model"]["id"] == model_id and details["model"]["device"] == "cpu"
    assert details["seconds"] >= 0


# --- the API surface ---------------------------------------------------------------------------------


def test_the_five_endpoints_have_stable_names_and_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name, parameters in ENDPOINTS.items():
        assert [p["parameter_name"] for p in api[name]["parameters"]] == parameters
        returns = [r["label"] for r in api[name]["returns"]]
        assert returns[-2:] == ["Answered by", "Details"]


def test_every_model_event_shares_one_bounded_queue_group(tiny_app):
    fns = {fn.api_name: fn for fn in tiny_app.demo.fns.values()}
    limits = {(fns[name[1:]].concurrency_id, fns[name[1:]].concurrency_limit) for name in ENDPOINTS}
    assert limits == {("models", 2)}  # one group; 2 at once on CPU
    assert fns["caption"].batch and fns["zero_shot"].batch and fns["caption"].max_batch_size == 4
    assert fns["transcribe"].batch and not fns["vqa"].batch
    assert all(fns[name[1:]].queue for name in ENDPOINTS)  # no route around the queue
    assert tiny_app.demo.mmdemo_queue_limits == {"models": tiny_app.settings.max_queue}


# --- good calls ------------------------------------------------------------------------------------------


def test_caption(client):
    caption, answered_by, details = client.predict(handle_file(CAT), api_name="/caption")
    assert isinstance(caption, str) and caption
    assert details["text"] == caption and details["batch"] == 1
    assert_provenance(answered_by, details, "tiny-blip-caption")


def test_caption_with_prefix_and_beams(client):
    caption, _, details = client.predict(handle_file(COFFEE), prefix="a cup of", num_beams=2, max_new_tokens=5,
                                         api_name="/caption")
    assert isinstance(caption, str) and details["model"]["id"] == "tiny-blip-caption"


def test_vqa_scoring_model_lists_top_answers(client):
    answer, top, answered_by, details = client.predict(handle_file(CAT), question="What animal is this?", top_k=3,
                                                       api_name="/vqa")
    assert answer == details["answer"] and len(details["answers"]) == 3
    assert top["label"] == answer and len(top["confidences"]) == 3
    assert_provenance(answered_by, details, "tiny-vilt-vqa")


def test_vqa_generating_model_gives_no_scores(client):
    answer, top, _, details = client.predict(handle_file(CAT), question="What is it?", model="tiny-blip-vqa",
                                             api_name="/vqa")
    assert isinstance(answer, str) and details["answers"] == []
    assert top is None or not top.get("confidences")


def test_text_to_image_png_carries_its_settings_and_the_seed_reproduces(client):
    gallery, seed, answered_by, details = client.predict(prompt="a red bicycle", negative_prompt="blurry",
                                                         num_images=2, seed=123, randomize_seed=False,
                                                         api_name="/text_to_image")
    assert seed == 123 and len(gallery) == 2
    assert_provenance(answered_by, details, "tiny-stable-diffusion")
    png = Image.open(gallery[0]["image"])
    assert png.format == "PNG" and png.size == (64, 64)
    metadata = json.loads(png.text["parameters"])
    assert metadata["seed"] == 123 and metadata["prompt"] == "a red bicycle"
    assert metadata["model"] == "tiny-stable-diffusion" and metadata["num_images"] == 2
    again, *_ = client.predict(prompt="a red bicycle", negative_prompt="blurry", num_images=2, seed=123,
                               randomize_seed=False, api_name="/text_to_image")
    assert np.array_equal(np.asarray(png), np.asarray(Image.open(again[0]["image"])))
    # Each image has its own seed (seed + i), in the details, its caption and its PNG.
    assert details["seeds"] == [123, 124] and [item["caption"] for item in gallery] == ["seed 123", "seed 124"]
    assert json.loads(Image.open(gallery[1]["image"]).text["parameters"])["seed"] == 124


def test_text_to_image_random_seed_is_reported(client):
    _, seed, _, details = client.predict(prompt="a cabin", seed=5, randomize_seed=True, api_name="/text_to_image")
    assert isinstance(seed, int) and details["seed"] == seed and details["settings"]["seed"] == seed


def test_zero_shot_scores_are_sorted(client):
    scores, answered_by, details = client.predict(handle_file(CAT), labels="cat, dog\ncup of coffee",
                                                  api_name="/zero_shot")
    confidences = [c["confidence"] for c in scores["confidences"]]
    assert sorted(c["label"] for c in scores["confidences"]) == ["cat", "cup of coffee", "dog"]
    assert confidences == sorted(confidences, reverse=True) and sum(confidences) == pytest.approx(1, abs=1e-3)
    assert_provenance(answered_by, details, "tiny-clip")


def test_zero_shot_multi_label_with_siglip(client):
    scores, _, details = client.predict(handle_file(CAT), labels="cat, dog", model="tiny-siglip", multi_label=True,
                                        api_name="/zero_shot")
    assert details["multi_label"] is True and len(scores["confidences"]) == 2


def test_transcribe_with_timestamps(client):
    text, segments, answered_by, details = client.predict(handle_file(SPEECH), timestamps=True, api_name="/transcribe")
    assert isinstance(text, str) and text == details["text"]
    assert segments["headers"] == ["start (s)", "end (s)", "text"] and len(segments["data"]) >= 1
    assert_provenance(answered_by, details, "tiny-whisper")


def test_transcribe_with_faster_whisper_without_timestamps(client):
    text, segments, _, details = client.predict(handle_file(SPEECH), model="tiny-faster-whisper", language="en",
                                                api_name="/transcribe")
    assert isinstance(text, str) and segments["data"] in ([], [["", "", ""]]) and details["language"] == "en"


# --- bad input: a readable message, and the app keeps working ------------------------------------------


BAD_CALLS = {
    "corrupt image": ("/caption", lambda f: dict(image=handle_file(f["corrupt"])), "not an image we can read"),
    "truncated image": ("/vqa", lambda f: dict(image=handle_file(f["truncated"]), question="what?"),
                        "damaged or incomplete"),
    "empty question": ("/vqa", lambda f: dict(image=handle_file(CAT), question="  "), "Please enter a question"),
    "empty prompt": ("/text_to_image", lambda f: dict(prompt=""), "Please enter a prompt"),
    "empty labels": ("/zero_shot", lambda f: dict(image=handle_file(CAT), labels=" , \n"), "at least one label"),
    "bad template": ("/zero_shot", lambda f: dict(image=handle_file(CAT), labels="cat", template="a photo"),
                     'contain "{}"'),
    "silent audio": ("/transcribe", lambda f: dict(audio=handle_file(f["silent"])), "silent"),
    "zero-length audio": ("/transcribe", lambda f: dict(audio=handle_file(f["empty"])), "empty"),
    "unknown model": ("/caption", lambda f: dict(image=handle_file(CAT), model="no-such-model"), "Unknown model"),
    "model of another task": ("/vqa", lambda f: dict(image=handle_file(CAT), question="?", model="tiny-clip"),
                              "serves zero-shot-image-classification"),
    "steps out of range": ("/text_to_image", lambda f: dict(prompt="x", steps=500), "between 1 and 150"),
}
GOOD_CALLS = {
    "/caption": dict(image=handle_file(CAT)),
    "/vqa": dict(image=handle_file(CAT), question="What is it?"),
    "/text_to_image": dict(prompt="a cat"),
    "/zero_shot": dict(image=handle_file(CAT), labels="cat, dog"),
    "/transcribe": dict(audio=handle_file(SPEECH)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_gets_a_readable_message_then_a_good_call_works(client, bad_files, case):
    endpoint, arguments, expected = BAD_CALLS[case]
    with pytest.raises(ValidationError) as refused:
        client.predict(**arguments(bad_files), api_name=endpoint)
    message = str(refused.value)
    assert expected in message and "Traceback" not in message and "/tmp/" not in message
    assert client.predict(**GOOD_CALLS[endpoint], api_name=endpoint)


def test_no_image_is_refused_with_a_hint(client):
    with pytest.raises(ValidationError, match="Please add an image"):
        client.predict(None, labels="cat", api_name="/zero_shot")


LONG = "x" * 2001
BLAMED = {  # a refused setting: the endpoint, its arguments, the parameter the message is shown on, the message
    "steps": ("/text_to_image", dict(prompt="a cat", steps=0), "The number of steps must be between 1 and 150"),
    "width": ("/text_to_image", dict(prompt="a cat", width=4096), "The width must be between 64 and 2048"),
    "height": ("/text_to_image", dict(prompt="a cat", height=32), "The height must be between 64 and 2048"),
    "num_images": ("/text_to_image", dict(prompt="a cat", num_images=9), "The number of images must be between"),
    "seed": ("/text_to_image", dict(prompt="a cat", seed=2**33, randomize_seed=False), "The seed must be between"),
    "guidance": ("/text_to_image", dict(prompt="a cat", guidance=31), "The guidance scale must be between"),
    "prompt": ("/text_to_image", dict(prompt=LONG), "The prompt is 2,001 characters long; the limit is 2,000."),
    "negative_prompt": ("/text_to_image", dict(prompt="a cat", negative_prompt="x" * 10_000_000),
                        "The negative prompt is 10,000,000 characters long; the limit is 2,000."),
    "prefix": ("/caption", dict(image=handle_file(CAT), prefix=LONG), "The start of the caption is 2,001 characters"),
    "max_new_tokens": ("/caption", dict(image=handle_file(CAT), max_new_tokens=0), "The maximum caption length"),
    "top_p": ("/caption", dict(image=handle_file(CAT), top_p=0), "The top-p must be between"),
    "top_k": ("/vqa", dict(image=handle_file(CAT), question="what?", top_k=0), "The number of answers must be"),
    "question": ("/vqa", dict(image=handle_file(CAT), question=LONG), "The question is 2,001 characters long"),
    "template": ("/zero_shot", dict(image=handle_file(CAT), labels="cat", template="a {} {x}"),
                 'The template may contain braces only as "{}"'),
    "labels": ("/zero_shot", dict(image=handle_file(CAT), labels="cat, " + "x" * 101), "The label 'xxxxx"),
    "multi_label": ("/zero_shot", dict(image=handle_file(CAT), labels="cat", model="tiny-clip", multi_label=True),
                    "Multi-label scores need"),
    "language": ("/transcribe", dict(audio=handle_file(SPEECH), language="x" * 100_000),
                 "The language is 100,000 characters long; the limit is 20."),
}


@pytest.mark.parametrize("parameter", list(BLAMED))
def test_a_refused_setting_is_reported_on_its_own_parameter(client, parameter):
    """Each message names the parameter it concerns (the UI shows it under that control), not the tab's
    main text; an oversized text is refused, never cut."""
    endpoint, arguments, expected = BLAMED[parameter]
    with pytest.raises(ValidationError) as refused:
        client.predict(**arguments, api_name=endpoint)
    lines = str(refused.value).splitlines()
    assert lines[0] == "1 parameter(s) failed validation:"  # only the parameter concerned is marked
    assert lines[1].startswith(f"- {parameter}: {expected}")


def test_a_model_that_fails_to_load_reports_it_and_only_its_calls_fail(client):
    with pytest.raises(AppError, match="could not be loaded") as failed:
        client.predict(handle_file(CAT), model="broken-caption", api_name="/caption")
    assert "Traceback" not in str(failed.value)
    summary, table = client.predict(api_name="/models_status")
    assert "broken-caption" in summary
    assert ["broken-caption", "failed", "image-to-text"] in [row[:3] for row in table["data"]]
    assert client.predict(handle_file(CAT), api_name="/caption")[0]  # the same tab, another model
    assert client.predict(handle_file(CAT), labels="cat", api_name="/zero_shot")[0]  # another tab


def test_model_specific_refusal_is_validated_before_queueing(client):
    """Multi-label on a softmax model depends on the model, yet is refused per request before the queue
    (so it never fails a batch it would have joined)."""
    with pytest.raises(ValidationError, match="Multi-label scores need"):
        client.predict(handle_file(CAT), labels="cat, dog", model="tiny-clip", multi_label=True, api_name="/zero_shot")


# --- batching and the queue -------------------------------------------------------------------------------


def test_waiting_requests_are_batched_and_a_bad_one_fails_alone(tiny_app):
    client = Client(tiny_app.url, verbose=False)
    client.predict(handle_file(CAT), labels="warm", api_name="/zero_shot")  # model loaded before the burst

    def call(i: int):
        try:
            labels = "" if i == 5 else f"cat, dog, label {i}"
            return client.predict(handle_file(CAT), labels=labels, api_name="/zero_shot")
        except ValidationError as exc:
            return exc

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    assert isinstance(results[5], ValidationError)
    good = [r for i, r in enumerate(results) if i != 5]
    assert all(isinstance(r, tuple) for r in good)
    assert all(f"label {i}" in [c["label"] for c in r[0]["confidences"]] for i, r in enumerate(results) if i != 5)
    assert max(r[2]["batch"] for r in good) > 1  # requests waiting in the queue ran together


# --- composition and configuration -------------------------------------------------------------------


def test_each_tab_runs_as_an_app_of_its_own(tiny_settings):
    from mmdemo.tasks.spec import resolve, task_specs
    from mmdemo.ui import models_panel, vqa
    from mmdemo.ui.common import AppContext

    ctx = AppContext.create(tiny_settings)
    expected = {resolve(spec.tab): spec.api_name for spec in task_specs()}
    assert set(expected.values()) >= {"caption", "vqa", "text_to_image", "zero_shot", "transcribe", "detect"}
    expected[models_panel] = "models_status"
    for module, api_name in expected.items():
        demo = module.demo(ctx)
        assert api_name in {fn.api_name for fn in demo.fns.values()}
    alone = vqa.demo(ctx)
    _, url, _ = alone.launch(prevent_thread_lock=True, quiet=True)
    try:
        answer, *_ = Client(url, verbose=False).predict(handle_file(CAT), question="What?", api_name="/vqa")
        assert isinstance(answer, str)
    finally:
        alone.close()


def test_listen_address_follows_gradio_variables_unless_mmdemo_ones_are_set():
    from mmdemo.config import Settings
    from mmdemo.server import listen_address

    space = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}
    assert listen_address(Settings(), {}) == ("127.0.0.1", 7860)
    assert listen_address(Settings(), space) == ("0.0.0.0", 7861)
    assert listen_address(Settings(host="10.0.0.2", port=9000), {**space, "MMDEMO_HOST": "10.0.0.2",
                                                                "MMDEMO_PORT": "9000"}) == ("10.0.0.2", 9000)


# --- start-up --------------------------------------------------------------------------------------------


def test_building_the_app_loads_no_model_and_no_torch(tiny_settings):
    code = (
        "import sys; from mmdemo.config import Settings; from mmdemo.server import build_app; "
        "from mmdemo.tasks import open_registry; "
        f"s = Settings(profile='tiny', data_dir={str(tiny_settings.data_dir)!r}); "
        "r = open_registry(s); build_app(s, r); "
        "assert 'torch' not in sys.modules, 'torch imported'; assert r.status()['loaded'] == []; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_python_app_py_serves_the_tiny_profile(tiny_settings, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MMDEMO_DATA_DIR": str(tiny_settings.data_dir), "MMDEMO_MAX_QUEUE": "5"}
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "app.py", "--profile", "tiny", "--port", str(port)], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 90
        while True:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                alive = process.poll() is None and time.monotonic() < deadline
                assert alive, (tmp_path / "app.log").read_text()[-3000:]
                time.sleep(0.5)
        scores, answered_by, _ = client.predict(handle_file(CAT), labels="cat, dog", api_name="/zero_shot")
        assert "tiny-clip" in answered_by and len(scores["confidences"]) == 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_queue_does_not_summarise_its_history_after_every_event(tiny_settings):
    """gradio recomputes a pandas summary of its last 10,000 events after each one unless told otherwise
    (3-11 ms of CPU a call); the app tells it to do so rarely."""
    from mmdemo.config import GRADIO_SUMMARY_EVERY
    from mmdemo.server import build_app

    demo = build_app(tiny_settings)
    assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == GRADIO_SUMMARY_EVERY >= 1000
