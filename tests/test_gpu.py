"""GPU tier (``--run-gpu``): every task on CUDA in half precision, and eviction returning CUDA memory."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmdemo.tasks import run

pytestmark = pytest.mark.gpu

IMAGE = Image.new("RGB", (64, 48), "orange")
TONE = (16_000, (0.3 * np.sin(2 * np.pi * 220 * np.arange(32_000) / 16_000)).astype(np.float32))
CASES = [
    ("image-to-text", "tiny-blip-caption", {"image": IMAGE}),
    ("visual-question-answering", "tiny-vilt-vqa", {"image": IMAGE, "question": "what?"}),
    ("visual-question-answering", "tiny-blip-vqa", {"image": IMAGE, "question": "what?"}),
    ("zero-shot-image-classification", "tiny-clip", {"image": IMAGE, "labels": "a,b"}),
    ("zero-shot-image-classification", "tiny-siglip", {"image": IMAGE, "labels": "a,b", "multi_label": True}),
    ("text-to-image", "tiny-stable-diffusion", {"prompt": "a cat", "seed": 1, "steps": 2}),
    ("automatic-speech-recognition", "tiny-whisper", {"audio": TONE, "language": "en"}),
    ("automatic-speech-recognition", "tiny-faster-whisper", {"audio": TONE, "language": "en"}),
]


@pytest.fixture(scope="module")
def cuda_registry(tiny_settings):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from mmdemo.tasks import open_registry

    return open_registry(tiny_settings.replace(device="auto"))


@pytest.mark.parametrize("task, model_id, inputs", CASES, ids=[c[1] for c in CASES])
def test_every_task_runs_on_cuda_in_half_precision(cuda_registry, task, model_id, inputs):
    result = run(cuda_registry, task, model_id, **inputs)
    assert result["model"]["device"] == "cuda"
    assert result["model"]["dtype"] in ("float16", "bfloat16")
