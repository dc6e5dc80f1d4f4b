"""Feedback writes under concurrency: records per second and latency, on SQLite and PostgreSQL.

    python bench/feedback_writes.py                       # 32 writers x 100 records, both databases
    python bench/feedback_writes.py --writers 64 --per-writer 50 --backends sqlite

Two operations, each timed from the call to its durable return:

* ``feedback``: ``add_feedback`` on an output recorded beforehand (what a rating / correction click does);
* ``output``: ``record_output`` with a small distinct image (what every task result does), then
  ``add_feedback`` on it.

After each run the store is checked: exactly writers x per-writer records, no duplicates, no failures,
and (SQLite) ``PRAGMA integrity_check`` = ok. Target: p99 under 50 ms on SQLite.
PostgreSQL is the throwaway local server of ``tests/pg.py`` (fsync on), or ``MMDEMO_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mmdemo.feedback import FeedbackStore  # noqa: E402

MODEL = {"id": "bench-model", "revision": "0" * 40, "backend": "transformers"}


def image(n: int) -> Image.Image:
    """A 32x32 image unique to ``n`` (so that every output stores its own file)."""
    img = Image.new("RGB", (32, 32), (n % 251, (n // 251) % 251, 7))
    img.putpixel((n % 32, (n // 32) % 32), (255, 255, 255))
    return img


def run(store: FeedbackStore, op: str, writers: int, per_writer: int) -> dict:
    total = writers * per_writer
    output_ids: list[str] = []
    if op == "feedback":
        for n in range(total):
            output_ids.append(store.record_output("image-to-text", inputs={"image": image(n)},
                                                  output={"text": f"caption {n}", "model": MODEL}))
    latencies: list[float] = []
    failures: list[str] = []
    record_ids: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(writers)

    def writer(w: int) -> None:
        mine, errors, ids = [], [], []
        barrier.wait()
        for i in range(per_writer):
            n = w * per_writer + i
            started = time.perf_counter()
            try:
                if op == "feedback":
                    output_id = output_ids[n]
                else:
                    output_id = store.record_output("image-to-text", inputs={"image": image(n)},
                                                    output={"text": f"caption {n}", "model": MODEL})
                saved = store.add_feedback(output_id, annotator=f"writer-{w}", thumbs=-1,
                                           correction=f"corrected caption {n}", comment="bench")
                ids.append(saved.id)
            except Exception as exc:  # counted, reported
                errors.append(f"{type(exc).__name__}: {exc}")
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            failures.extend(errors)
            record_ids.extend(ids)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "op": op,
        "records": len(record_ids),
        "stored": store.count(),
        "distinct_ids": len(set(record_ids)),
        "failures": len(failures),
        "first_failure": failures[0] if failures else "",
        "per_s": len(latencies) / elapsed,
        "p50": statistics.median(ms),
        "p99": ms[min(len(ms) - 1, int(round(0.99 * len(ms))) - 1)],
        "max": ms[-1],
        "integrity": store.integrity_check(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--per-writer", type=int, default=100)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--ops", default="feedback,output")
    args = parser.parse_args()
    print(f"{args.writers} writer threads x {args.per_writer} records each; latency of one durable write\n")
    print(f"{'backend':<10} {'op':<9} {'rec/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'records':>8} {'failed':>6}  check")
    ok = True
    for backend in args.backends.split(","):
        server = url = None
        if backend == "postgres":
            import pg

            try:
                server = pg.start_postgres(durable=True)
            except pg.PostgresUnavailable as exc:
                print(f"postgres   skipped: {exc}")
                continue
        for op in args.ops.split(","):
            with tempfile.TemporaryDirectory(prefix="mmdemo-bench-") as tmp:
                if server is not None:
                    url = server.create_database("bench")
                store = FeedbackStore(url, Path(tmp), pool_size=args.writers)
                try:
                    r = run(store, op, args.writers, args.per_writer)
                finally:
                    store.close()
                    if server is not None and url:
                        server.drop_database(url)
            expected = args.writers * args.per_writer
            good = (r["records"] == r["stored"] == r["distinct_ids"] == expected and not r["failures"]
                    and r["integrity"] == "ok")
            ok &= good
            print(f"{backend:<10} {op:<9} {r['per_s']:>8.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f} "
                  f"{r['stored']:>8} {r['failures']:>6}  {'ok' if good else 'FAILED ' + r['first_failure']}")
        if server is not None:
            server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
