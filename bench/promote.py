"""Promote: the time from the click (the admin's ``/promote`` call) to the first answer from the new model,
while clients keep calling the task without naming a model; and how long another replica on the same
feedback store takes to serve it (it reads the store every MMDEMO_DEFAULTS_POLL_S seconds, then loads).

    python bench/promote.py                  # tiny profile, 5 rounds, 4 clients
    python bench/promote.py --rounds 10 --clients 8

Each round promotes tiny-siglip over tiny-clip (Classify) and rolls back. "cold": tiny-siglip is unloaded
before the promotion, so the time includes loading it (the old default answers meanwhile); "warm": it was
preloaded. Calls that fail are counted (there should be none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from mmdemo.application import App  # noqa: E402
from mmdemo.config import Settings  # noqa: E402
from mmdemo.server import build_app, launch  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"
TASK, OLD, NEW = "zero-shot-image-classification", "tiny-clip", "tiny-siglip"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Callers:
    """``n`` clients calling /zero_shot without a model, each answer's end time and model kept."""

    def __init__(self, url: str, n: int) -> None:
        self.answers: list[tuple[float, str]] = []
        self.failures = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._call, args=(url,), daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def _call(self, url: str) -> None:
        client = Client(url, verbose=False)
        while not self.stop.is_set():
            try:
                _, _, details = client.predict(handle_file(IMAGE), labels="cat, dog", api_name="/zero_shot")
                self.answers.append((time.perf_counter(), details["model"]["id"]))
            except Exception:  # noqa: BLE001 - counted
                self.failures += 1

    def first_answer_from(self, model: str, since: float, timeout: float = 120.0) -> float:
        """Seconds from ``since`` to the first answer from ``model`` that ended after it."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            ends = [end for end, answered_by in list(self.answers) if answered_by == model and end >= since]
            if ends:
                return min(ends) - since
            time.sleep(0.005)
        raise TimeoutError(f"no answer from {model} within {timeout} s")

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="mmdemo-bench-promote-"))
    settings = Settings(profile="tiny", data_dir=data_dir, device="cpu", port=free_port())
    demo = build_app(settings)
    ctx = demo.mmdemo_context
    _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
    cookies = dict(httpx.get(url.rstrip("/") + ctx.gate.admin_path()).cookies)
    admin = Client(url, verbose=False, httpx_kwargs={"cookies": cookies})
    other = App.create(settings)  # a second replica on the same data dir and store
    other.registry.preload([OLD])
    other.defaults.start()
    ctx.registry.preload([OLD, NEW])  # the models' first load (and the libraries' imports) out of the figures
    callers = Callers(url, args.clients)
    times: dict[str, list[float]] = {"cold": [], "warm": [], "other replica": [], "the /promote call": []}
    try:
        callers.first_answer_from(OLD, 0.0)
        for n in range(args.rounds * 2):
            kind = "cold" if n % 2 == 0 else "warm"
            if kind == "cold":
                ctx.registry.unload(NEW)
                other.registry.unload(NEW)
            started = time.perf_counter()
            admin.predict(NEW, api_name="/promote")
            times["the /promote call"].append(time.perf_counter() - started)
            times[kind].append(callers.first_answer_from(NEW, started))
            while other.registry.catalog.default_for(TASK).id != NEW:
                time.sleep(0.005)
            times["other replica"].append(time.perf_counter() - started)
            admin.predict(TASK, api_name="/rollback")
            callers.first_answer_from(OLD, time.perf_counter())
            while other.registry.catalog.default_for(TASK).id != OLD:
                time.sleep(0.005)
    finally:
        callers.close()
        other.close()
        demo.close()
    print(f"promote {NEW} over {OLD} with {args.clients} clients calling /zero_shot, {args.rounds} rounds each:\n"
          "time from the /promote call to the first answer from the new model (here: cold, warm; the other "
          "replica: its switch), and the /promote call alone")
    for kind, values in times.items():
        ms = [v * 1000 for v in values]
        print(f"  {kind:<18} median {statistics.median(ms):7.0f} ms  "
              f"min {min(ms):7.0f}  max {max(ms):7.0f}")
    print(f"  answers: {len(callers.answers)}, failed calls: {callers.failures} "
          f"(poll interval of the other replica: {settings.defaults_poll_s:g} s)")


if __name__ == "__main__":
    main()
