"""What the Prometheus instrumentation costs a model call: the tiny captioner called directly
(``mmdemo.tasks.run``) and inside the same instrumentation the app's handlers use
(``Metrics.timed`` and the batch-size histogram), interleaved in one run; plus the time of one
``/metrics`` exposition with the gauges read.

    python bench/metrics_overhead.py               # 200 calls each way
    python bench/metrics_overhead.py --calls 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmdemo.config import Settings  # noqa: E402
from mmdemo.ops import Metrics, registry_gauges  # noqa: E402
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.tasks import run  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"
MODEL, TASK = "tiny-blip-caption", "image-to-text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls each way (after 5 warm-up calls)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmdemo-bench-") as tmp:
        settings = Settings(profile="tiny", data_dir=Path(tmp), device="cpu")
        registry = open_registry(settings)
        metrics = Metrics()
        metrics.set_gauges("models", registry_gauges(registry))

        def plain() -> float:
            started = time.perf_counter()
            run(registry, TASK, MODEL, image=IMAGE, max_new_tokens=5)
            return time.perf_counter() - started

        def instrumented() -> float:
            started = time.perf_counter()
            metrics.batch_size.labels(TASK).observe(1)
            with metrics.timed(TASK, [MODEL]):
                run(registry, TASK, MODEL, image=IMAGE, max_new_tokens=5)
            return time.perf_counter() - started

        for _ in range(5):
            plain(), instrumented()
        plain_s, instrumented_s = [], []
        for _ in range(args.calls):  # interleaved: both see the same machine state
            plain_s.append(plain())
            instrumented_s.append(instrumented())

        overhead_s = []
        for _ in range(args.calls * 10):  # the instrumentation alone, without the model call
            started = time.perf_counter()
            metrics.batch_size.labels(TASK).observe(1)
            with metrics.timed(TASK, [MODEL]):
                pass
            overhead_s.append(time.perf_counter() - started)
        scrape_s = []
        for _ in range(50):
            started = time.perf_counter()
            metrics.exposition()
            scrape_s.append(time.perf_counter() - started)

    plain_ms, instrumented_ms = statistics.median(plain_s) * 1000, statistics.median(instrumented_s) * 1000
    print(f"\n{MODEL}, {args.calls} calls each way, one at a time")
    print(f"{'direct tasks.run':<34} {plain_ms:>9.2f} ms (median)")
    print(f"{'inside the instrumentation':<34} {instrumented_ms:>9.2f} ms (median)")
    print(f"{'ratio':<34} {instrumented_ms / plain_ms:>9.3f}")
    print(f"{'instrumentation alone':<34} {statistics.median(overhead_s) * 1e6:>9.1f} µs (median)")
    print(f"{'one /metrics exposition':<34} {statistics.median(scrape_s) * 1000:>9.2f} ms (median)")


if __name__ == "__main__":
    main()
