"""How fast ``python app.py --profile tiny`` is usable: process start -> page served (no model loaded),
-> first answer (the model loaded on that first call).

    python bench/startup.py             # 3 runs, median
    python bench/startup.py --runs 5

Tiny checkpoints are built before timing, so building them is not counted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(data_dir: Path, timeout: float) -> tuple[float, float]:
    from gradio_client import Client, handle_file

    port = free_port()
    env = {**os.environ, "MMDEMO_DATA_DIR": str(data_dir), "GRADIO_ANALYTICS_ENABLED": "False"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "app.py", "--profile", "tiny", "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = started + timeout
        while True:  # bounded by the deadline
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError("the page was not served in time")
            time.sleep(0.05)
        page_ready = time.perf_counter() - started
        Client(url, verbose=False).predict(handle_file(ROOT / "assets" / "cat.jpg"), labels="cat, dog",
                                           api_name="/zero_shot")
        first_answer = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    return page_ready, first_answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120, help="seconds allowed per run")
    args = parser.parse_args()
    from mmdemo.config import Settings
    from mmdemo.tasks import build_tiny_models

    with tempfile.TemporaryDirectory(prefix="mmdemo-bench-") as tmp:
        build_tiny_models(Settings(profile="tiny", data_dir=Path(tmp)).tiny_dir)
        runs = [one_run(Path(tmp), args.timeout) for _ in range(args.runs)]
    pages, answers = [r[0] for r in runs], [r[1] for r in runs]
    print(f"\npython app.py --profile tiny, {args.runs} runs (seconds, median [min-max])")
    print(f"page served (no model loaded):    {statistics.median(pages):.1f} [{min(pages):.1f}-{max(pages):.1f}]")
    print(f"first /zero_shot answer (loads):  {statistics.median(answers):.1f} [{min(answers):.1f}-{max(answers):.1f}]")


if __name__ == "__main__":
    sys.exit(main())
