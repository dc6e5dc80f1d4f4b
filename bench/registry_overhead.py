"""The registry's own cost per call, side by side with calling the same loaded model directly.

For each tiny model (where overhead shows most) it alternates, in one run, many calls of
  direct:   task.predict(bundle, request)
  registry: registry.call(model_id, lambda bundle: task.predict(bundle, request))
on the same prepared request. The ratio is 1 + the median of the paired differences (each registry call
against the direct call next to it) over the median direct time: robust to a busy machine. It also
measures the registry's pure bookkeeping per call (lease, counters, lock) with a no-op body.
Requirement (issue 2): at most 1.05.

    python bench/registry_overhead.py [--rounds 200] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mmdemo.config import Settings  # noqa: E402
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.tasks import get_task, prepare  # noqa: E402

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
TONE = (16_000, (0.3 * np.sin(2 * np.pi * 220 * np.arange(32_000) / 16_000)).astype(np.float32))
CASES = [
    ("image-to-text", "tiny-blip-caption", {"image": IMAGE, "max_new_tokens": 8}),
    ("visual-question-answering", "tiny-vilt-vqa", {"image": IMAGE, "question": "what is this?"}),
    ("zero-shot-image-classification", "tiny-clip", {"image": IMAGE, "labels": "cat,dog,bird"}),
    ("text-to-image", "tiny-stable-diffusion", {"prompt": "a red bicycle", "steps": 2, "seed": 1}),
    ("automatic-speech-recognition", "tiny-faster-whisper", {"audio": TONE, "language": "en"}),
]


def measure(rounds: int, data_dir: Path) -> list[tuple[str, float, float, float]]:
    registry = open_registry(Settings(profile="tiny", data_dir=data_dir, device="cpu"))
    rows = []
    for task, model_id, inputs in CASES:
        spec, request = prepare(registry, task, model_id, inputs)
        runner = get_task(task)
        bundle = registry.call(model_id, lambda b: b)  # load once, outside the timing
        body = lambda b: runner.predict(b, request)  # noqa: E731
        for _ in range(5):  # warm-up both paths
            runner.predict(bundle, request)
            registry.call(model_id, body)
        direct, via_registry = [], []
        for i in range(rounds):  # alternate the order so drift hits both sides equally
            for path in ((0, 1) if i % 2 == 0 else (1, 0)):
                started = time.perf_counter()
                if path == 0:
                    runner.predict(bundle, request)
                else:
                    registry.call(model_id, body)
                (direct if path == 0 else via_registry).append(time.perf_counter() - started)
        paired = statistics.median(v - d for v, d in zip(via_registry, direct))
        rows.append((model_id, statistics.median(direct), statistics.median(via_registry), paired))
    return rows


def bookkeeping_seconds(data_dir: Path, calls: int = 20_000) -> float:
    """The registry's own cost per call: ``registry.call`` with a no-op body, minus calling the body."""
    registry = open_registry(Settings(profile="tiny", data_dir=data_dir, device="cpu"))
    registry.call("tiny-clip", lambda b: None)
    noop = lambda b: None  # noqa: E731
    started = time.perf_counter()
    for _ in range(calls):
        noop(None)
    bare = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(calls):
        registry.call("tiny-clip", noop)
    return (time.perf_counter() - started - bare) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.rounds, args.data_dir or Path(tmp))
        bookkeeping = bookkeeping_seconds(args.data_dir or Path(tmp))
    print(f"{'model':<24}{'direct ms':>11}{'registry ms':>13}{'paired diff us':>16}{'ratio':>8}")
    worst = 0.0
    for model_id, direct, via, paired in rows:
        ratio = 1 + paired / direct
        worst = max(worst, ratio)
        print(f"{model_id:<24}{direct * 1e3:>11.3f}{via * 1e3:>13.3f}{paired * 1e6:>16.1f}{ratio:>8.3f}")
    print(f"worst ratio {worst:.3f} (requirement: <= 1.05), {args.rounds} alternating pairs per model")
    print(f"registry bookkeeping per call (no-op body): {bookkeeping * 1e6:.1f} us")
    return 0 if worst <= 1.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
