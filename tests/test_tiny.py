"""mmdemo.tiny: the tiny offline checkpoints build, cache, and load through the ordinary paths."""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import pytest
from PIL import Image

from mmdemo import tasks, tiny
import mmdemo.tiny.common  # noqa: F401 (tiny.common.VQA_ANSWERS)

SAMPLE_RATE = 16000


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("tiny-models")
    tasks.build_tiny_models(target)
    return target


@pytest.fixture(scope="session")
def image() -> Image.Image:
    pixels = (np.random.RandomState(0).rand(40, 60, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def _noise(seconds: float) -> np.ndarray:
    return (np.random.RandomState(1).randn(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)


def _has_words(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]", text)) and "<|" not in text and "[" not in text


def _folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")
    }


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- building, caching, locking ---------------------------------------------------------------


def test_layout_marker_and_size(tiny_dir):
    assert tuple(tasks.tiny_builders()) == (
        "blip-caption", "blip-vqa", "vilt-vqa", "stable-diffusion", "clip",
        "siglip", "whisper", "whisper-ct2", "owlv2", "owlvit", "grounding-dino",
    )
    for name in tasks.tiny_builders():
        assert tiny.tiny_model_dir(tiny_dir, name, tasks.tiny_builders()) == tiny_dir / name
        assert (tiny_dir / name).is_dir()
    assert (tiny_dir / ".tiny-version").read_text().strip() == str(tiny.TINY_BUILDER_VERSION)
    assert not list(tiny_dir.glob(".*.tmp-*"))  # no half-built leftovers
    total = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert total < 10_000_000


def test_second_build_is_a_noop(tiny_dir):
    before = {name: _folder_state(tiny_dir / name) for name in tasks.tiny_builders()}
    start = time.perf_counter()
    folders = tasks.build_tiny_models(tiny_dir)
    assert time.perf_counter() - start < 1.0
    assert folders == {name: tiny_dir / name for name in tasks.tiny_builders()}
    assert {name: _folder_state(tiny_dir / name) for name in tasks.tiny_builders()} == before


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(KeyError):
        tasks.build_tiny_models(tmp_path, names=["gpt-5"])
    with pytest.raises(KeyError):
        tiny.tiny_model_dir(tmp_path, "gpt-5", tasks.tiny_builders())


def test_version_mismatch_rebuilds_deterministically(tmp_path):
    folders = tasks.build_tiny_models(tmp_path, names=["clip", "vilt-vqa"])
    assert set(folders) == {"clip", "vilt-vqa"}
    first = _file_bytes(tmp_path / "clip")
    (tmp_path / "clip" / "from-the-old-build").write_text("x")  # gone once the folder is rebuilt
    (tmp_path / ".tiny-version").write_text("-1\n")
    (tmp_path / ".clip.tmp-12345").mkdir()  # leftover of a crashed build

    tasks.build_tiny_models(tmp_path, names=["clip"])

    assert (tmp_path / ".tiny-version").read_text().strip() == str(tiny.TINY_BUILDER_VERSION)
    assert not (tmp_path / "clip" / "from-the-old-build").exists()  # rebuilt (inodes can be reused) ...
    assert _file_bytes(tmp_path / "clip") == first  # ... into the very same files
    assert not (tmp_path / "vilt-vqa").exists()  # stale folders of the old version are dropped
    assert not (tmp_path / ".clip.tmp-12345").exists()


def test_force_rebuilds_and_dependencies_come_along(tmp_path):
    folders = tasks.build_tiny_models(tmp_path, names=["whisper-ct2"])
    assert folders == {"whisper-ct2": tmp_path / "whisper-ct2"}
    assert (tmp_path / "whisper" / "config.json").is_file()  # built from the tiny whisper
    (tmp_path / "whisper-ct2" / "from-the-old-build").write_text("x")
    tasks.build_tiny_models(tmp_path, names=["whisper-ct2"], force=True)
    assert not (tmp_path / "whisper-ct2" / "from-the-old-build").exists()  # rebuilt


def test_build_waits_for_the_lock(tmp_path):
    with open(tmp_path / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=tasks.build_tiny_models, args=(tmp_path,), kwargs={"names": ["vilt-vqa"]}
        )
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and not (tmp_path / "vilt-vqa").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert (tmp_path / "vilt-vqa" / "config.json").is_file()


# --- the models load through the ordinary paths and produce sensible output -------------------


def test_blip_caption(tiny_dir, image):
    from transformers import AutoProcessor, BlipForConditionalGeneration, pipeline

    folder = tiny_dir / "blip-caption"
    processor = AutoProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder)
    out = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=8)
    caption = processor.decode(out[0], skip_special_tokens=True)
    assert caption.strip() and _has_words(caption)

    captioner = pipeline("image-text-to-text", model=str(folder))
    result = captioner(image, text="", max_new_tokens=5)
    assert _has_words(result[0]["generated_text"])


def test_blip_vqa(tiny_dir, image):
    from transformers import AutoProcessor, BlipForQuestionAnswering

    folder = tiny_dir / "blip-vqa"
    processor = AutoProcessor.from_pretrained(folder)
    model = BlipForQuestionAnswering.from_pretrained(folder)
    inputs = processor(images=image, text="what color is the car?", return_tensors="pt")
    answer = processor.decode(model.generate(**inputs, max_new_tokens=4)[0], skip_special_tokens=True)
    assert _has_words(answer)


def test_vilt_vqa(tiny_dir, image):
    from transformers import AutoProcessor, ViltForQuestionAnswering

    folder = tiny_dir / "vilt-vqa"
    processor = AutoProcessor.from_pretrained(folder)
    model = ViltForQuestionAnswering.from_pretrained(folder)
    assert {"yes", "no", "2", "red", "dog"} <= set(model.config.label2id)
    inputs = processor(images=image, text="how many dogs are there?", return_tensors="pt")
    assert max(inputs["pixel_values"].shape[-2:]) <= 64  # kept small, so inference is fast
    logits = model(**inputs).logits
    assert logits.shape == (1, len(model.config.id2label))
    assert model.config.id2label[int(logits.argmax(-1))] in tiny.common.VQA_ANSWERS


@pytest.mark.parametrize("name, model_cls", [("clip", "CLIPModel"), ("siglip", "SiglipModel")])
def test_contrastive_models(tiny_dir, image, name, model_cls):
    import transformers

    folder = tiny_dir / name
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = getattr(transformers, model_cls).from_pretrained(folder)
    labels = ["a photo of a cat", "a dog!", "a red car, parked"]
    inputs = processor(images=[image, image], text=labels, padding="max_length", return_tensors="pt")
    assert model(**inputs).logits_per_image.shape == (2, 3)

    classifier = transformers.pipeline("zero-shot-image-classification", model=str(folder))
    scores = classifier(image, candidate_labels=["cat", "dog", "car"])
    assert sorted(s["label"] for s in scores) == ["car", "cat", "dog"]


def test_whisper_files(tiny_dir):
    from transformers import AutoFeatureExtractor, GenerationConfig, WhisperProcessor

    folder = tiny_dir / "whisper"
    tokenizer = WhisperProcessor.from_pretrained(folder).tokenizer
    ids = tokenizer.convert_tokens_to_ids
    vocab = tokenizer.get_vocab()
    for token in ("<|en|>", "<|fr|>", "<|de|>", "<|es|>", "<|transcribe|>", "<|translate|>",
                  "<|notimestamps|>", "<|startoftranscript|>", "<|endoftext|>", "<|0.00|>", "<|30.00|>"):
        assert token in vocab, token
    assert ids("<|0.00|>") == ids("<|notimestamps|>") + 1 and ids("<|30.00|>") == len(tokenizer) - 1
    text = "Hello, world! 42"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    features = AutoFeatureExtractor.from_pretrained(folder)
    assert (features.feature_size, features.sampling_rate) == (80, SAMPLE_RATE)
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.lang_to_id["<|en|>"] == ids("<|en|>")
    assert generation.task_to_id == {
        "transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")
    }
    assert generation.no_timestamps_token_id == ids("<|notimestamps|>")
    assert generation.decoder_start_token_id == ids("<|startoftranscript|>")


@pytest.fixture(scope="module")
def asr(tiny_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    folder = tiny_dir / "whisper"
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    return pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        chunk_length_s=30,
    )


@pytest.mark.parametrize("seconds", [5, 70])
@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_whisper_pipeline(asr, seconds, timestamps, task):
    result = asr(
        {"raw": _noise(seconds), "sampling_rate": SAMPLE_RATE},
        return_timestamps=timestamps,
        generate_kwargs={"language": "en", "task": task},
    )
    assert _has_words(result["text"])
    if timestamps:
        assert result["chunks"] and all(_has_words(chunk["text"]) for chunk in result["chunks"])
        assert all(len(chunk["timestamp"]) == 2 for chunk in result["chunks"])


def test_whisper_pipeline_from_folder(tiny_dir):
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(tiny_dir / "whisper"))
    assert _has_words(asr({"raw": _noise(3), "sampling_rate": SAMPLE_RATE})["text"])


def test_faster_whisper(tiny_dir):
    from faster_whisper import WhisperModel

    folder = str(tiny_dir / "whisper-ct2")
    model = WhisperModel(folder, device="cpu", compute_type="float32", cpu_threads=2)
    segments, info = model.transcribe(_noise(5), language="en")
    segments = list(segments)
    assert info.language == "en" and segments
    assert all(0 <= s.start <= s.end <= 5.0 + 1e-6 for s in segments)
    assert any(_has_words(s.text) for s in segments)

    segments, _ = model.transcribe(_noise(70), language="en", beam_size=1, temperature=0.0)
    segments = list(segments)
    assert len(segments) >= 3 and all(_has_words(s.text) for s in segments)


def test_stable_diffusion(tiny_dir):
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_dir / "stable-diffusion")
    pipe.set_progress_bar_config(disable=True)

    def draw(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        image = pipe("a red car", num_inference_steps=2, generator=generator).images[0]
        assert image.size == (64, 64)
        return np.asarray(image)

    first = draw(0)
    assert np.array_equal(first, draw(0))
    assert not np.array_equal(first, draw(1))
