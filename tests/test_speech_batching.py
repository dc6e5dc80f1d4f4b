"""Speech recognition batches: the transformers Whisper runs requests with the same settings in one
pipeline call (short and chunked >30 s audio, timestamps), faster-whisper runs a batch one request at a
time; either way each result is the one the request gets alone, in the input order. Then the same
through ``/transcribe`` with several clients at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import ValidationError

from mmdemo.errors import InvalidInputError
from mmdemo.media import Audio
from mmdemo.tasks import prepare, run, run_batch
from mmdemo.tasks.speech import SpeechRequest, SpeechTask, WhisperBundle

ASR = "automatic-speech-recognition"
RATE = 16_000
SPEECH = Path(__file__).resolve().parents[1] / "assets" / "speech.wav"


def tone(seconds: float, hz: float) -> np.ndarray:
    """A modulated tone, not silent, different for each ``hz``."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def wav_file(folder: Path, name: str, samples: np.ndarray) -> Path:
    path = folder / name
    sf.write(path, samples, RATE, subtype="PCM_16")
    return path


# A mix of settings (language, translate, timestamps) and of short and chunked (>30 s) audio; the
# language token steers the tiny model, so requests of different languages get different text.
MIXED = [
    dict(audio=tone(2, 220), language="en"),
    dict(audio=tone(35, 330), language="en", timestamps=True),  # two 30 s chunks
    dict(audio=tone(3, 440), language="de"),
    dict(audio=tone(4, 550), language="en"),
    dict(audio=tone(3, 150), language="en", timestamps=True),
    dict(audio=tone(2, 800), language="fr", translate=True),
    dict(audio=tone(5, 660), language="de"),
    dict(audio=tone(34, 180), language="en", timestamps=True),
]


def inputs(request: dict) -> dict:
    return {**request, "audio": (RATE, request["audio"])}


def comparable(result: dict) -> dict:
    return {key: result.get(key) for key in ("text", "chunks", "language")}


# --- the task layer ------------------------------------------------------------------------------------


def test_whisper_batch_equals_unbatched_in_input_order(shared_registry):
    singles = [run(shared_registry, ASR, "tiny-whisper", **inputs(r)) for r in MIXED]
    batch = run_batch(shared_registry, ASR, "tiny-whisper", [inputs(r) for r in MIXED])
    assert [comparable(r) for r in batch] == [comparable(r) for r in singles]
    assert len({r["text"] for r in singles}) > 2  # different inputs, different text: order is checked
    assert all("batch" not in r for r in singles)
    # requests with the same settings and both short or both chunked shared one pipeline call
    assert [r["batch"] for r in batch] == [2, 2, 2, 2, 1, 1, 2, 2]
    long_with_timestamps = batch[1]["chunks"]
    assert long_with_timestamps and all(set(c) == {"start", "end", "text"} for c in long_with_timestamps)


def test_whisper_batch_of_one_setting_and_auto_language(shared_registry):
    requests = [dict(audio=(RATE, tone(s, hz))) for s, hz in ((2, 200), (3, 300), (4, 400))]
    requests.append(dict(audio=str(SPEECH)))
    singles = [run(shared_registry, ASR, "tiny-whisper", **r) for r in requests]
    batch = run_batch(shared_registry, ASR, "tiny-whisper", requests)
    assert [comparable(r) for r in batch] == [comparable(r) for r in singles]
    assert [r["batch"] for r in batch] == [4, 4, 4, 4]


def test_faster_whisper_batch_runs_one_by_one(shared_registry):
    requests = [inputs(MIXED[i]) for i in (0, 4, 3)]  # short and English: the tiny CTranslate2 model is English-only
    batch = run_batch(shared_registry, ASR, "tiny-faster-whisper", requests)
    assert [r["batch"] for r in batch] == [1, 1, 1]
    assert all(isinstance(r["text"], str) and r["model"]["backend"] == "ctranslate2" for r in batch)
    assert batch[1]["chunks"] and "chunks" not in batch[0] and "chunks" not in batch[2]


def test_faster_whisper_fallback_keeps_order_and_settings():
    """faster-whisper samples when its greedy pass fails (temperature fallback), so the tiny model's text is
    not repeatable; a stand-in model shows that every request is transcribed alone, with its settings."""
    calls = []

    class StandIn:
        def transcribe(self, samples, language, task, beam_size, without_timestamps, condition_on_previous_text):
            calls.append(len(samples))
            text = f"{len(samples)} {task} {language}"
            segment = SimpleNamespace(start=0.0, end=len(samples) / RATE, text=f" {text} ")
            return iter([segment]), SimpleNamespace(language="en")

    bundle = WhisperBundle("ctranslate2", StandIn(), frozenset({"en", "de"}), placement=None)
    requests = [SpeechRequest(Audio(tone(s, 300), RATE), language=lang, translate=tr, timestamps=ts)
                for s, lang, tr, ts in ((2, "de", False, True), (1, None, True, False), (3, "en", False, False))]
    results = SpeechTask().predict_batch(bundle, requests)
    assert calls == [32_000, 16_000, 48_000]
    assert results == [
        {"text": "32000 transcribe de", "language": "de", "chunks": [{"start": 0.0, "end": 2.0,
                                                                       "text": "32000 transcribe de"}], "batch": 1},
        {"text": "16000 translate None", "language": "en", "batch": 1},
        {"text": "48000 transcribe en", "language": "en", "batch": 1},
    ]


def test_unknown_language_is_refused_before_any_model_loads(fresh_registry):
    registry = fresh_registry()
    with pytest.raises(InvalidInputError, match="not a Whisper language code"):
        prepare(registry, ASR, "tiny-whisper", {"audio": (RATE, tone(1, 300)), "language": "klingon"})
    assert not registry.is_loaded("tiny-whisper")
    _, request = prepare(registry, ASR, "tiny-whisper", {"audio": (RATE, tone(1, 300)), "language": " DE "})
    assert request.language == "de"


# --- through the app -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def burst(tiny_app, tmp_path_factory):
    """Thirteen /transcribe calls at once: tiny-whisper with one setting for most (so that they can share a
    model call) and others with timestamps (one chunked) or another language, two on tiny-faster-whisper and
    one with an unknown language; and what each valid one gives alone."""
    folder = tmp_path_factory.mktemp("speech-burst")
    calls = [dict(audio=wav_file(folder, f"short-{i}.wav", tone(2 + i % 3, 200 + 60 * i)), model="tiny-whisper",
                  language="en", translate=False, timestamps=False) for i in range(7)]
    calls += [dict(audio=wav_file(folder, "long.wav", tone(35, 330)), model="tiny-whisper", language="en",
                   translate=False, timestamps=True),
              dict(audio=SPEECH, model="tiny-whisper", language="auto", translate=False, timestamps=True),
              dict(audio=calls[0]["audio"], model="tiny-whisper", language="de", translate=True, timestamps=False),
              dict(audio=calls[1]["audio"], model="tiny-faster-whisper", language="en", translate=False,
                   timestamps=False),
              dict(audio=SPEECH, model="tiny-faster-whisper", language="en", translate=False, timestamps=True),
              dict(audio=calls[2]["audio"], model="tiny-whisper", language="klingon", translate=False,
                   timestamps=False)]
    # Alone, on the app's own registry (the app runs in this process); this loads both models before the burst.
    alone = [None if c["language"] == "klingon" else
             run(tiny_app.registry, ASR, c["model"], audio=str(c["audio"]), language=c["language"],
                 translate=c["translate"], timestamps=c["timestamps"])
             for c in calls]
    client = Client(tiny_app.url, verbose=False)

    def call(arguments: dict):
        try:
            return client.predict(**{**arguments, "audio": handle_file(arguments["audio"])}, api_name="/transcribe")
        except ValidationError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(call, calls))
    return SimpleNamespace(calls=calls, alone=alone, answers=answers)


def test_concurrent_transcribe_calls_are_batched_with_the_results_of_single_calls(burst):
    whisper = [(answer, alone) for call, answer, alone in zip(burst.calls, burst.answers, burst.alone)
               if call["model"] == "tiny-whisper" and alone is not None]
    assert len(whisper) == 10
    for (transcript, segments, answered_by, details), alone in whisper:
        assert transcript == details["text"] == alone["text"] and transcript
        assert details.get("chunks") == alone.get("chunks") and details["model"]["id"] == "tiny-whisper"
        assert details["output_id"] and "tiny-whisper" in answered_by
        if details["batch"] > 1:
            assert f"batched with {details['batch'] - 1} other request" in answered_by
    assert max(details["batch"] for (_, _, _, details), _ in whisper) > 1  # waiting requests ran together


def test_faster_whisper_requests_in_a_burst_run_alone_and_a_bad_language_fails_alone(burst):
    *answers, refused = burst.answers[10:]
    for transcript, segments, answered_by, details in answers:
        assert isinstance(transcript, str) and details["model"]["id"] == "tiny-faster-whisper"
        assert details["batch"] == 1 and "batched with" not in answered_by  # no cross-request batching there
        assert details["language"] == "en" and details["output_id"]
    assert "chunks" in answers[1][3] and "chunks" not in answers[0][3]
    assert isinstance(refused, ValidationError) and "not a Whisper language code" in str(refused)
