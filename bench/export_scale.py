"""Export at scale: time and peak memory for 1,000 and 10,000 captioning records with images.

    python bench/export_scale.py                      # 1,000 and 10,000 records, all three formats
    python bench/export_scale.py --sizes 10000 --formats parquet

Each record has its own 64x64 noise image (about 12 KB as PNG, so 10,000 records are ~120 MB of
media). Every export runs in a fresh process that reports:

* wall time of ``export_dataset``;
* peak RSS (``VmRSS``, sampled every 5 ms) above the process's RSS before the export started;
  it includes pages of memory-mapped Arrow files (``datasets`` format), which the kernel can drop;
* peak anonymous memory (``RssAnon``) above its level before the export: the heap alone;
* ``ru_maxrss`` of the whole process, for reference.

An export that streams has about the same peak memory for 1,000 and 10,000 records. (The
``datasets`` format ends with ``Dataset.save_to_disk``, which copies in batches of up to 100 MB:
its peak is bounded by that, not by the size of the dataset.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mmdemo.feedback import FeedbackStore, export_dataset

MODEL = {"id": "bench-model", "revision": "0" * 40, "backend": "transformers"}


def fill(data_dir: Path, count: int) -> float:
    """A store with ``count`` corrected captions, each on its own image."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)]
    with FeedbackStore(None, data_dir) as store:
        def one(n: int) -> None:
            output_id = store.record_output("image-to-text", inputs={"image": Image.fromarray(noise[n])},
                                            output={"text": f"model caption {n}", "model": MODEL})
            store.add_feedback(output_id, annotator=f"annotator-{n % 7}", thumbs=-1,
                               correction=f"a corrected caption for image number {n}")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))
    return time.perf_counter() - started


def memory_kb() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process, in KB."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:")):
                name, value = line.split()[:2]
                values[name] = int(value)
    return values.get("VmRSS:", 0), values.get("RssAnon:", 0)


def child(data_dir: Path, fmt: str, out: Path) -> None:
    """Run one export and print its measurements as JSON."""
    import datasets  # noqa: F401  (imported before the baseline, as the app has it loaded)
    import pyarrow  # noqa: F401

    store = FeedbackStore(None, data_dir)
    store.count()
    base = peak = memory_kb()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            now = memory_kb()
            peak = (max(peak[0], now[0]), max(peak[1], now[1]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = export_dataset(store, "image-to-text", out, format=fmt, only="corrected", val_fraction=0.1)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({
        "rows": summary.total_rows, "seconds": seconds, "bytes": size,
        "rss_mb": (peak[0] - base[0]) / 1024, "anon_mb": (peak[1] - base[1]) / 1024,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--formats", default="datasets,parquet,jsonl")
    parser.add_argument("--child", nargs=3, metavar=("DATA", "FORMAT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        return 0
    print(f"{'records':>8} {'format':<9} {'seconds':>8} {'rows/s':>8} {'out MB':>7} "
          f"{'peak RSS +MB':>13} {'peak anon +MB':>14} {'maxrss MB':>10}")
    with tempfile.TemporaryDirectory(prefix="mmdemo-export-bench-") as tmp:
        for size in map(int, args.sizes.split(",")):
            data = Path(tmp) / f"store-{size}"
            fill_seconds = fill(data, size)
            print(f"# filled a store with {size} records and images in {fill_seconds:.1f}s", flush=True)
            for fmt in args.formats.split(","):
                out = Path(tmp) / f"out-{size}-{fmt}"
                done = subprocess.run([sys.executable, __file__, "--child", str(data), fmt, str(out)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"{size:>8} {fmt:<9} FAILED\n{done.stderr[-2000:]}")
                    return 1
                r = json.loads(done.stdout.strip().splitlines()[-1])
                assert r["rows"] == size, r
                print(f"{size:>8} {fmt:<9} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>8.0f} "
                      f"{r['bytes'] / 1e6:>7.1f} {r['rss_mb']:>13.1f} {r['anon_mb']:>14.1f} "
                      f"{r['maxrss_mb']:>10.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
