"""Slow tier (``--run-slow``): the built-in full-size models from the Hub on the example assets.

Needs network access to the Hugging Face Hub (or a warm HF cache); never runs in the default tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdemo.config import Settings
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.tasks import run

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def hub_registry(tmp_path_factory):
    return open_registry(Settings(data_dir=tmp_path_factory.mktemp("hub"), memory_budget="0.8"))


@pytest.mark.parametrize("model_id", ["blip-caption-base", "blip-caption-large"])
def test_captions_name_the_cat(hub_registry, model_id):
    assert "cat" in run(hub_registry, "image-to-text", model_id, image=ASSETS / "cat.jpg")["text"].lower()


@pytest.mark.parametrize("model_id", ["vilt-vqa", "blip-vqa-base"])
def test_vqa_knows_the_animal(hub_registry, model_id):
    result = run(hub_registry, "visual-question-answering", model_id, image=ASSETS / "cat.jpg",
                 question="What animal is this?")
    assert "cat" in result["answer"].lower()


@pytest.mark.parametrize("model_id", ["clip-vit-base-patch32", "siglip-base"])
def test_zero_shot_ranks_cat_first(hub_registry, model_id):
    result = run(hub_registry, "zero-shot-image-classification", model_id, image=ASSETS / "cat.jpg",
                 labels="cat, dog, rocket, cup of coffee")
    assert result["labels"][0]["label"] == "cat"


@pytest.mark.parametrize("model_id", ["whisper-small", "faster-whisper-small"])
def test_speech_is_transcribed(hub_registry, model_id):
    result = run(hub_registry, "automatic-speech-recognition", model_id, audio=ASSETS / "speech.wav", language="en")
    assert len(result["text"].split()) >= 3


def test_sd_turbo_makes_a_512_image(hub_registry):
    result = run(hub_registry, "text-to-image", "sd-turbo", prompt="a red bicycle", seed=1)
    assert result["images"][0].size == (512, 512)
