"""Every task through ``mmdemo.tasks.run`` on the tiny real architectures: results, options, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmdemo.errors import (
    AudioTooLongError,
    ImageTooLargeError,
    InvalidAudioError,
    InvalidImageError,
    InvalidInputError,
    RequestInterrupted,
    TaskMismatchError,
    UnknownModelError,
)
from mmdemo.tasks import run, run_batch
from mmdemo.tasks.zero_shot import parse_labels

SPEECH = Path(__file__).resolve().parents[1] / "assets" / "speech.wav"


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def speech_like(seconds: float, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    """A tone mix with an amplitude envelope, a stand-in for speech that is not silent."""
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    signal += 0.1 * np.sin(2 * np.pi * 660 * t)
    signal = signal.astype(np.float32)
    return np.stack([signal] * channels, axis=1) if channels > 1 else signal


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


# --- captioning ---------------------------------------------------------------------------------


def test_caption_returns_text(shared_registry, photo):
    result = run(shared_registry, "image-to-text", "tiny-blip-caption", image=photo, max_new_tokens=8)
    assert isinstance(result["text"], str) and result["text"]
    assert result["model"]["id"] == "tiny-blip-caption"


def test_caption_default_model_and_beams(shared_registry, photo):
    greedy = run(shared_registry, "image-to-text", image=photo, max_new_tokens=6)
    beams = run(shared_registry, "image-to-text", image=photo, max_new_tokens=6, num_beams=3)
    assert greedy["model"]["id"] == beams["model"]["id"] == "tiny-blip-caption"
    assert isinstance(beams["text"], str)


def test_caption_batch_matches_single_calls(shared_registry, photo):
    other = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    singles = [run(shared_registry, "image-to-text", "tiny-blip-caption", image=img)["text"] for img in (photo, other)]
    batch = run_batch(shared_registry, "image-to-text", "tiny-blip-caption", [{"image": photo}, {"image": other}])
    assert [r["text"] for r in batch] == singles


def test_caption_refuses_bad_images(shared_registry, tmp_path):
    with pytest.raises(InvalidImageError, match="not an image"):
        run(shared_registry, "image-to-text", image=b"definitely not a png")
    truncated = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(truncated, format="JPEG")
    with pytest.raises(InvalidImageError):
        run(shared_registry, "image-to-text", image=truncated.getvalue()[:300])
    with pytest.raises(ImageTooLargeError, match="limit"):
        bomb = io.BytesIO()
        Image.new("1", (10_000, 5_000)).save(bomb, format="PNG")  # 50 MP, a few KB compressed
        run(shared_registry, "image-to-text", image=bomb.getvalue())


def test_caption_normalises_odd_image_modes(shared_registry):
    for image in (Image.new("RGBA", (30, 30), (0, 0, 0, 0)), Image.new("I;16", (30, 30), 40000),
                  Image.new("CMYK", (30, 30)), Image.new("P", (30, 30)), Image.new("L", (30, 30))):
        assert isinstance(run(shared_registry, "image-to-text", image=image)["text"], str)


def test_caption_settings_are_validated(shared_registry, photo):
    with pytest.raises(InvalidInputError, match="between 1 and 200"):
        run(shared_registry, "image-to-text", image=photo, max_new_tokens=0)
    with pytest.raises(InvalidInputError, match="does not take: colour"):
        run(shared_registry, "image-to-text", image=photo, colour="red")


# --- VQA ------------------------------------------------------------------------------------------


def test_vilt_vqa_gives_top_answers_with_scores(shared_registry, photo):
    result = run(shared_registry, "visual-question-answering", "tiny-vilt-vqa", image=photo,
                 question="What color is the car?", top_k=3)
    assert len(result["answers"]) == 3
    scores = [a["score"] for a in result["answers"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert result["answer"] == result["answers"][0]["answer"]


def test_blip_vqa_generates_an_answer(shared_registry, photo):
    result = run(shared_registry, "visual-question-answering", "tiny-blip-vqa", image=photo, question="what is it?")
    assert isinstance(result["answer"], str) and result["answers"] == []


@pytest.mark.parametrize("question", ["", "   ", None])
def test_vqa_refuses_empty_question(shared_registry, photo, question):
    with pytest.raises(InvalidInputError, match="question"):
        run(shared_registry, "visual-question-answering", image=photo, question=question)


# --- zero-shot ------------------------------------------------------------------------------------


def test_zero_shot_sorted_softmax_scores(shared_registry, photo):
    result = run(shared_registry, "zero-shot-image-classification", "tiny-clip", image=photo,
                 labels="cat, dog\nbird, Cat ,  dog")
    labels = [item["label"] for item in result["labels"]]
    assert sorted(labels) == ["bird", "cat", "dog"]
    scores = [item["score"] for item in result["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-3)


def test_zero_shot_multi_label_uses_sigmoid_on_siglip(shared_registry, photo):
    result = run(shared_registry, "zero-shot-image-classification", "tiny-siglip", image=photo,
                 labels=["cat", "dog", "car"], multi_label=True)
    assert result["multi_label"] is True
    scores = [item["score"] for item in result["labels"]]
    assert all(0 < s < 1 for s in scores)
    assert sum(scores) != pytest.approx(1.0, abs=1e-3)


def test_zero_shot_multi_label_on_clip_is_refused_before_loading(fresh_registry, photo):
    registry = fresh_registry()
    with pytest.raises(InvalidInputError, match="SigLIP"):
        run(registry, "zero-shot-image-classification", "tiny-clip", image=photo, labels="a,b", multi_label=True)
    assert registry.status()["loaded"] == []


def test_zero_shot_batch_matches_single_and_caches_labels(shared_registry, photo):
    other = photo.rotate(90)
    single = [run(shared_registry, "zero-shot-image-classification", "tiny-clip", image=img, labels="x,y,z")
              for img in (photo, other)]
    batch = run_batch(shared_registry, "zero-shot-image-classification", "tiny-clip",
                      [{"image": photo, "labels": "x,y,z"}, {"image": other, "labels": "x,y,z"}])
    for one, batched in zip(single, batch):
        assert [i["label"] for i in one["labels"]] == [i["label"] for i in batched["labels"]]
        for a, b in zip(one["labels"], batched["labels"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-3)
    cache = shared_registry.call("tiny-clip", lambda bundle: dict(bundle.text_cache))
    assert (("x", "y", "z"), "a photo of a {}.") in cache


@pytest.mark.parametrize("labels", ["", " , ,\n", [], None])
def test_zero_shot_refuses_empty_labels(shared_registry, photo, labels):
    with pytest.raises(InvalidInputError, match="at least one label"):
        run(shared_registry, "zero-shot-image-classification", image=photo, labels=labels)


def test_zero_shot_template_needs_a_placeholder(shared_registry, photo):
    with pytest.raises(InvalidInputError, match="exactly once"):
        run(shared_registry, "zero-shot-image-classification", image=photo, labels="a", template="a photo")


@pytest.mark.parametrize("template", ["{:x>10000000}{{}}", "a {} {x}", "a {0} {}", "{}}", "a {{}} photo"])
def test_zero_shot_template_takes_no_braces_but_its_slot(fresh_registry, photo, template):
    """A format spec would have made 10 M characters per label; a named field failed after queueing."""
    registry = fresh_registry()
    with pytest.raises(InvalidInputError, match='(braces only as|exactly once).*"{}"') as refused:
        run(registry, "zero-shot-image-classification", "tiny-clip", image=photo, labels="cat, dog", template=template)
    assert refused.value.field == "template"
    assert registry.status()["loaded"] == []  # refused before any model was loaded


def test_zero_shot_labels_and_templates_are_filled_in_literally(shared_registry, photo):
    result = run(shared_registry, "zero-shot-image-classification", "tiny-clip", image=photo,
                 labels=["{0}", "{name}", "50% {:>9}"], template="art: {} (100%)")
    assert sorted(item["label"] for item in result["labels"]) == ["50% {:>9}", "{0}", "{name}"]
    cache = shared_registry.call("tiny-clip", lambda bundle: dict(bundle.text_cache))
    assert (("{0}", "{name}", "50% {:>9}"), "art: {} (100%)") in cache


def test_parse_labels_keeps_order_and_odd_characters():
    assert parse_labels("Ünïcode, emoji 🐱,  multiple   spaces ,ÜNÏCODE") == ("Ünïcode", "emoji 🐱", "multiple spaces")
    with pytest.raises(InvalidInputError, match="limit is 100"):
        parse_labels([f"label {i}" for i in range(101)])


# --- every free-text input: refused over its limit, never cut; errors name their field ------------

BIG = "x" * 10_000_000
OVERSIZED_TEXT = [  # task, inputs, the field refused, the start of its message
    ("text-to-image", dict(prompt="x" * 2001), "prompt", "The prompt is 2,001 characters long; the limit is 2,000."),
    ("text-to-image", dict(prompt="a cat", negative_prompt=BIG), "negative_prompt",
     "The negative prompt is 10,000,000 characters long"),
    ("image-to-text", dict(prefix=BIG), "prefix", "The start of the caption is 10,000,000 characters long"),
    ("visual-question-answering", dict(question=BIG), "question", "The question is 10,000,000 characters long"),
    ("zero-shot-image-classification", dict(labels="cat", template=BIG + "{}"), "template", "The template is"),
    ("zero-shot-image-classification", dict(labels=BIG), "labels", "The list of labels is 10,000,000 characters"),
    ("zero-shot-image-classification", dict(labels=["cat", BIG]), "labels", "The label is 10,000,000 characters"),
    ("zero-shot-image-classification", dict(labels=[f"label {i}" for i in range(10_000)]), "labels",
     "10000 labels given"),
    ("automatic-speech-recognition", dict(language=BIG), "language", "The language is 10,000,000 characters"),
]


@pytest.mark.parametrize("task, inputs, field, message", OVERSIZED_TEXT, ids=[f"{c[0]}-{c[2]}" for c in OVERSIZED_TEXT])
def test_oversized_text_is_refused_before_any_work(fresh_registry, photo, task, inputs, field, message):
    registry = fresh_registry()
    media = {"automatic-speech-recognition": {"audio": (16_000, speech_like(1))}, "text-to-image": {}}.get(
        task, {"image": photo})
    with pytest.raises(InvalidInputError) as refused:
        run(registry, task, **media, **inputs)
    assert str(refused.value).startswith(message) and len(str(refused.value)) < 200
    assert refused.value.field == field
    assert registry.status()["loaded"] == []


@pytest.mark.parametrize("task, inputs, field", [
    ("text-to-image", dict(prompt="x", steps=0), "steps"),
    ("text-to-image", dict(prompt="x", guidance=float("nan")), "guidance"),
    ("text-to-image", dict(prompt="x", width=4096), "width"),
    ("text-to-image", dict(prompt="x", height=2048, width=2048), "width"),  # over the pixel limit set below
    ("text-to-image", dict(prompt="x", num_images=2.5), "num_images"),
    ("text-to-image", dict(prompt="x", seed=2**40), "seed"),
    ("text-to-image", dict(prompt=" "), "prompt"),
    ("image-to-text", dict(max_new_tokens=0), "max_new_tokens"),
    ("image-to-text", dict(num_beams="many"), "num_beams"),
    ("image-to-text", dict(temperature=9), "temperature"),
    ("image-to-text", dict(top_p=0), "top_p"),
    ("visual-question-answering", dict(question="q", top_k=0), "top_k"),
    ("visual-question-answering", dict(question="q", max_new_tokens=1000), "max_new_tokens"),
    ("visual-question-answering", dict(question=""), "question"),
    ("zero-shot-image-classification", dict(labels=" , "), "labels"),
    ("zero-shot-image-classification", dict(labels="a", template="no slot"), "template"),
    ("zero-shot-image-classification", dict(labels="a", model="tiny-clip", multi_label=True), "multi_label"),
    ("automatic-speech-recognition", dict(language="klingon"), "language"),
])
def test_a_refused_setting_names_its_field(fresh_registry, photo, task, inputs, field):
    registry = fresh_registry(max_image_pixels=1_000_000)
    media = {"image-to-text": {"image": photo}, "visual-question-answering": {"image": photo},
             "zero-shot-image-classification": {"image": photo},
             "automatic-speech-recognition": {"audio": (16_000, speech_like(1))}}.get(task, {})
    settings = {key: value for key, value in inputs.items() if key != "model"}
    with pytest.raises(InvalidInputError) as refused:
        run(registry, task, inputs.get("model"), **media, **settings)
    assert refused.value.field == field
    message = str(refused.value)
    assert not message.startswith(("The a ", "The an ", "The the ")), message


# --- extreme aspect ratios ------------------------------------------------------------------------

IMAGE_MODELS = [
    ("image-to-text", "tiny-blip-caption", {}),
    ("visual-question-answering", "tiny-vilt-vqa", {"question": "what is it?"}),
    ("visual-question-answering", "tiny-blip-vqa", {"question": "what is it?"}),
    ("zero-shot-image-classification", "tiny-clip", {"labels": "cat, dog"}),
    ("zero-shot-image-classification", "tiny-siglip", {"labels": "cat, dog"}),
]


@pytest.mark.parametrize("size", [(1, 400), (400, 1), (40, 400), (400, 40)])
@pytest.mark.parametrize("task, model_id, inputs", IMAGE_MODELS, ids=[m[1] for m in IMAGE_MODELS])
def test_every_image_model_takes_extreme_strips(shared_registry, task, model_id, inputs, size):
    """ViLT's processor rounded the short side of a 1:400 strip to 0 ("Size must contain 'height' and
    'width' keys"); the strip is padded instead, for every model."""
    strip = Image.new("RGB", size, "red")
    result = run(shared_registry, task, model_id, image=strip, **inputs)
    assert result.get("text") is not None or result.get("answer") is not None or result.get("labels")


def test_strips_are_padded_within_the_pixel_limit():
    from mmdemo.media import MAX_ASPECT_RATIO, MediaLimits, fit_aspect_ratio, load_image

    padded = load_image(Image.new("RGB", (400, 2), "red"), max_aspect_ratio=MAX_ASPECT_RATIO)
    assert padded.size == (400, 100)
    assert padded.getpixel((200, 50)) == (255, 0, 0) and padded.getpixel((200, 0)) == (255, 255, 255)
    assert load_image(Image.new("RGB", (2, 400))).size == (2, 400)  # only images for models are padded
    square = Image.new("RGB", (300, 100), "blue")
    assert fit_aspect_ratio(square) is square  # within the ratio: untouched
    limits = MediaLimits(max_image_pixels=10_000)
    long_strip = fit_aspect_ratio(Image.new("RGB", (9_000, 1), "red"), 4, limits)  # 9,000 x 2,250 padded
    assert long_strip.size[0] / long_strip.size[1] <= 4 and long_strip.size[0] * long_strip.size[1] <= 10_000


# --- text-to-image --------------------------------------------------------------------------------


def test_text_to_image_is_reproducible_with_a_seed(shared_registry):
    steps = []
    first = run(shared_registry, "text-to-image", prompt="a red bicycle", seed=42, steps=3,
                progress=lambda done, total: steps.append((done, total)))
    again = run(shared_registry, "text-to-image", prompt="a red bicycle", seed=42, steps=3)
    other = run(shared_registry, "text-to-image", prompt="a red bicycle", seed=43, steps=3)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert first["seed"] == 42 and first["images"][0].size == (64, 64)
    assert np.array_equal(np.asarray(first["images"][0]), np.asarray(again["images"][0]))
    assert not np.array_equal(np.asarray(first["images"][0]), np.asarray(other["images"][0]))


def test_text_to_image_random_seed_is_reported_and_reusable(shared_registry):
    result = run(shared_registry, "text-to-image", prompt="a cat", num_images=2, steps=2, width=64, height=72)
    assert len(result["images"]) == 2 and result["images"][0].size == (64, 72)
    replay = run(shared_registry, "text-to-image", prompt="a cat", num_images=2, steps=2, width=64, height=72,
                 seed=result["seed"])
    assert np.array_equal(np.asarray(result["images"][1]), np.asarray(replay["images"][1]))


def test_text_to_image_each_image_has_its_own_reproducible_seed(shared_registry):
    batch = run(shared_registry, "text-to-image", prompt="a cat", num_images=2, steps=2, seed=2**32 - 1)
    assert batch["seeds"] == [2**32 - 1, 0]  # seed + i, wrapping past the largest seed
    assert not np.array_equal(np.asarray(batch["images"][0]), np.asarray(batch["images"][1]))
    for seed, image in zip(batch["seeds"], batch["images"]):
        alone = run(shared_registry, "text-to-image", prompt="a cat", num_images=1, steps=2, seed=seed)
        assert alone["seeds"] == [seed]
        assert np.abs(np.asarray(alone["images"][0], dtype=int) - np.asarray(image, dtype=int)).max() <= 1


def test_text_to_image_stops_at_the_next_step_when_asked(shared_registry):
    done = []
    with pytest.raises(RequestInterrupted, match="Interrupted at step 3/50"):
        run(shared_registry, "text-to-image", prompt="a cat", steps=50, seed=1,
            progress=lambda step, total: done.append(step), should_stop=lambda: len(done) >= 3)
    assert done == [1, 2, 3]


def test_text_to_image_warns_when_prompt_is_truncated(shared_registry):
    result = run(shared_registry, "text-to-image", prompt=" ".join(["word"] * 200), steps=1, seed=1)
    assert any("cut off" in warning for warning in result["warnings"])


@pytest.mark.parametrize("changes, message", [
    ({"prompt": ""}, "Please enter a prompt; it is empty."),
    ({"prompt": "x", "width": 100}, "multiples of 8"),
    ({"prompt": "x", "steps": 0}, "between 1 and 150"),
    ({"prompt": "x", "guidance": float("nan")}, "guidance"),
    ({"prompt": "x", "num_images": 9}, "between 1 and 8"),
    ({"prompt": "x", "width": 4096, "height": 4096}, "between 64 and 2048"),
])
def test_text_to_image_refuses_bad_settings(shared_registry, changes, message):
    with pytest.raises(InvalidInputError, match=message):
        run(shared_registry, "text-to-image", **changes)


# --- speech recognition ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["tiny-whisper", "tiny-faster-whisper"])
def test_transcribe_any_rate_stereo_file(shared_registry, model_id):
    audio = wav_bytes(speech_like(3, rate=44_100, channels=2), 44_100)
    result = run(shared_registry, "automatic-speech-recognition", model_id, audio=audio, language="en")
    assert isinstance(result["text"], str) and result["language"] == "en"


@pytest.mark.parametrize("model_id", ["tiny-whisper", "tiny-faster-whisper"])
def test_transcribe_long_audio_in_chunks_with_timestamps(shared_registry, model_id):
    samples = speech_like(70)
    result = run(shared_registry, "automatic-speech-recognition", model_id, audio=(16_000, samples),
                 language="en", timestamps=True)
    assert isinstance(result["chunks"], list)
    for chunk in result["chunks"]:
        assert set(chunk) == {"start", "end", "text"}


@pytest.mark.parametrize("model_id", ["tiny-whisper", "tiny-faster-whisper"])
def test_transcribe_every_segment_has_an_end(shared_registry, model_id):
    duration = sf.info(SPEECH).duration
    result = run(shared_registry, "automatic-speech-recognition", model_id, audio=str(SPEECH), timestamps=True)
    assert result["chunks"]
    for chunk in result["chunks"]:
        assert isinstance(chunk["end"], float) and chunk["start"] <= chunk["end"] <= round(duration, 2) + 0.01


def test_transcribe_numpy_input_and_translate(shared_registry):
    samples = (speech_like(2, rate=8_000) * 32767).astype(np.int16)  # as gradio's microphone gives it
    result = run(shared_registry, "automatic-speech-recognition", "tiny-whisper", audio=(8_000, samples),
                 translate=True)
    assert isinstance(result["text"], str)


def test_transcribe_refuses_bad_audio(shared_registry):
    with pytest.raises(InvalidAudioError):
        run(shared_registry, "automatic-speech-recognition", audio=wav_bytes(np.zeros(0, np.float32), 16_000))
    with pytest.raises(InvalidAudioError, match="silen"):
        run(shared_registry, "automatic-speech-recognition", audio=wav_bytes(np.zeros(16_000, np.float32), 16_000))
    with pytest.raises(InvalidAudioError):
        run(shared_registry, "automatic-speech-recognition", audio=b"RIFF....WAVEfmt garbage")
    with pytest.raises(InvalidInputError, match="Language 'klingon'"):
        run(shared_registry, "automatic-speech-recognition", audio=(16_000, speech_like(1)), language="klingon")


def test_transcribe_refuses_audio_over_the_limit(fresh_registry):
    registry = fresh_registry(max_audio_seconds=5)
    with pytest.raises(AudioTooLongError):
        run(registry, "automatic-speech-recognition", audio=wav_bytes(speech_like(6), 16_000))
    assert registry.status()["loaded"] == []  # refused before any model was loaded


@pytest.mark.parametrize("task, inputs, error", [
    ("image-to-text", {}, InvalidImageError),
    ("visual-question-answering", {"image": None, "question": "q"}, InvalidImageError),
    ("zero-shot-image-classification", {"labels": "a"}, InvalidImageError),
    ("automatic-speech-recognition", {"audio": None}, InvalidAudioError),
])
def test_missing_media_is_a_readable_error(shared_registry, task, inputs, error):
    with pytest.raises(error, match="No (image|audio)"):
        run(shared_registry, task, **inputs)


# --- catalog rules through the task layer ---------------------------------------------------------


def test_model_must_serve_the_task(shared_registry, photo):
    with pytest.raises(TaskMismatchError, match="serves image-to-text"):
        run(shared_registry, "visual-question-answering", "tiny-blip-caption", image=photo, question="q")
    with pytest.raises(UnknownModelError):
        run(shared_registry, "image-to-text", "Salesforce/blip-image-captioning-base", image=photo)
    with pytest.raises(InvalidInputError, match="Unknown task"):
        run(shared_registry, "image-segmentation", image=photo)
