"""mmdemo against the peer: the hand-written multi-tab gradio app (``../shared/peer/app.py``, used verbatim),
both serving the same tiny checkpoints, both loaded by the same gradio_client clients.

    python bench/vs_peer.py                          # 5 rounds, 1 and 16 clients, /caption and /zero_shot
    python bench/vs_peer.py --rounds 7 --seconds 6 --peer /path/to/peer/app.py
    python bench/vs_peer.py --size mid --clients 16 --seconds 20   # BLIP base / CLIP B/32 sizes, random weights

Both servers run at once, each in a process of its own; each round measures every configuration
(endpoint x clients) on the peer and on mmdemo back to back, the order alternating from round to round,
so that both see the same machine. A measurement: each client sends calls one after another for
``--seconds``; calls/s is the calls answered over the wall time until the last one returned.

What each side does per call: the peer runs the model, one call at a time (``default_concurrency_limit=1``),
validates nothing beyond "an image was given" and records nothing. mmdemo validates every request before it
joins the queue, runs up to ``concurrency`` model calls at once, batches waiting ``/caption`` and
``/zero_shot`` requests, and records every result (input image, settings, output) in its feedback store,
which is the product. Captions stop after ``--max-new-tokens`` on both sides (the peer's MAX_NEW_TOKENS).

Issue 9's targets: on tiny, mmdemo/peer >= 1.0x with 1 client and >= 1.2x with 16 clients; on the mid-size
models (``--size mid``), >= 1.4x with 16 clients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batching import (IMAGES, LABELS, MODELS, ROOT, build_mid_models, drive, free_port, serve,  # noqa: E402
                      stop, wait_until_serving)
from gradio_client import Client, handle_file  # noqa: E402

from mmdemo.config import Settings  # noqa: E402
from mmdemo.tasks import build_tiny_models  # noqa: E402

PEER_APP = ROOT.parent / "shared" / "peer" / "app.py"
ENDPOINTS = {"/caption": "tiny-blip-caption", "/zero_shot": "tiny-clip"}  # mmdemo's model for each (tiny)
TARGETS = {"tiny": {1: 1.0, 16: 1.2}, "mid": {16: 1.4}}  # issue 9: mmdemo/peer calls/s, per size and clients
PEER_FOLDERS = {"/caption": "blip-caption", "/zero_shot": "clip"}  # the peer's model folder for each endpoint


def mid_size_models(tiny_dir: Path, out: Path) -> tuple[Path, Path]:
    """BLIP base and CLIP ViT-B/32 from their real configurations (random weights, ``bench/batching.py``):
    (mmdemo's catalog file, the peer's MODEL_DIR, where they stand in for its captioner and classifier;
    its other two models stay tiny, they are not called)."""
    catalog = build_mid_models(tiny_dir, out)
    peer_dir = out / "peer-models"
    peer_dir.mkdir(exist_ok=True)
    for name, target in {"blip-caption": out / "blip-base", "clip": out / "clip-b32",
                         "vilt-vqa": tiny_dir / "vilt-vqa", "whisper": tiny_dir / "whisper"}.items():
        if not (peer_dir / name).exists():
            (peer_dir / name).symlink_to(target, target_is_directory=True)
    return catalog, peer_dir


def start_peer(peer_app: Path, tiny_dir: Path, max_new_tokens: int) -> tuple[subprocess.Popen, str]:
    """The peer app as its docstring says: ``MODEL_DIR=<tiny dir> PORT=... python app.py``."""
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(tiny_dir), "PORT": str(port), "MAX_NEW_TOKENS": str(max_new_tokens),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(peer_app)], cwd=peer_app.parent, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    wait_until_serving(process, url, "the peer app")
    return process, url


def peer_call(endpoint: str):
    """One call of the peer's endpoint: (image, prefix) or (image, labels); the answer is the text or labels."""
    def call(client: Client, n: int):
        image = handle_file(IMAGES[n % len(IMAGES)])
        second = "" if endpoint == "/caption" else LABELS
        return client.predict(image, second, api_name=endpoint)
    return call


def mmdemo_call(endpoint: str, max_new_tokens: int, model: str):
    """One call of mmdemo's endpoint, with the same inputs and caption length; the answer is the first output."""
    def call(client: Client, n: int):
        image = handle_file(IMAGES[n % len(IMAGES)])
        if endpoint == "/caption":
            outputs = client.predict(image, "", model=model, max_new_tokens=max_new_tokens, api_name=endpoint)
        else:
            outputs = client.predict(image, LABELS, model=model, api_name=endpoint)
        return outputs[0]
    return call


def calls_per_second(handles: list[Client], call, seconds: float) -> tuple[float, list]:
    answers, wall = drive(handles, call, requests=10**6, max_seconds=seconds)
    return len(answers) / wall, [answer for _, answer in answers]


def caption_words(answers: list) -> float:
    """Mean words per caption: both sides must stop at the same length for the comparison to hold."""
    texts = [answer for answer in answers if isinstance(answer, str)]
    return statistics.mean(len(text.split()) for text in texts) if texts else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=Path, default=PEER_APP, help="the peer's app.py (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (at least 5 for the issue's figures)")
    parser.add_argument("--clients", default="1,16", help="numbers of concurrent clients, comma separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="caption length on both sides")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help="endpoints, comma separated")
    parser.add_argument("--size", choices=["tiny", "mid"], default="tiny",
                        help="tiny checkpoints, or BLIP base / CLIP B/32 built from their real configurations")
    args = parser.parse_args()
    if not args.peer.is_file():
        parser.error(f"no peer app at {args.peer} (give --peer)")
    client_counts = [int(n) for n in args.clients.split(",") if n.strip()]
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]

    with tempfile.TemporaryDirectory(prefix="mmdemo-vs-peer-") as tmp:
        settings = Settings(profile="tiny", data_dir=Path(tmp) / "data", device="cpu")
        build_tiny_models(settings.tiny_dir)
        peer_dir, models = settings.tiny_dir, ENDPOINTS
        if args.size == "mid":
            catalog, peer_dir = mid_size_models(settings.tiny_dir, Path(tmp) / "mid")
            settings, models = settings.replace(catalog=catalog), MODELS["mid"]
        peer, peer_url = start_peer(args.peer, peer_dir, args.max_new_tokens)
        try:
            mmdemo, mmdemo_url = serve(settings, settings.max_batch, settings.max_queue)
        except BaseException:
            stop(peer)
            raise
        try:
            most = max(client_counts)
            sides = {
                "peer": ([Client(peer_url, verbose=False) for _ in range(most)],
                         {endpoint: peer_call(endpoint) for endpoint in endpoints}),
                "mmdemo": ([Client(mmdemo_url, verbose=False) for _ in range(most)],
                           {endpoint: mmdemo_call(endpoint, args.max_new_tokens, models[endpoint]) for endpoint in endpoints}),
            }
            for handles, calls in sides.values():  # load the models, warm every path
                for endpoint in endpoints:
                    for n in range(3):
                        calls[endpoint](handles[0], n)
            rates: dict[tuple[str, int, str], list[float]] = {}
            words: dict[str, list[float]] = {"peer": [], "mmdemo": []}
            for round_index in range(args.rounds):
                order = ["peer", "mmdemo"] if round_index % 2 == 0 else ["mmdemo", "peer"]
                for endpoint in endpoints:
                    for clients in client_counts:
                        for side in order:
                            handles, calls = sides[side]
                            rate, answers = calls_per_second(handles[:clients], calls[endpoint], args.seconds)
                            rates.setdefault((endpoint, clients, side), []).append(rate)
                            if endpoint == "/caption":
                                words[side].append(caption_words(answers))
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            stop(mmdemo)
            stop(peer)

    import torch

    print(f"\nmmdemo ({args.size} models, max batch {settings.max_batch}, model calls at once: "
          f"{_concurrency(settings)}) against the peer (one call at a time); {args.rounds} rounds of "
          f"{args.seconds:g} s per measurement; max_new_tokens={args.max_new_tokens}; {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'endpoint':<11} {'clients':>7} {'peer calls/s':>12} {'mmdemo calls/s':>14} {'ratio (median)':>14} "
          f"{'min-max':>11} {'target':>7}")
    for endpoint in endpoints:
        for clients in client_counts:
            peer_rates, ours = rates[(endpoint, clients, "peer")], rates[(endpoint, clients, "mmdemo")]
            ratios = [mine / theirs for mine, theirs in zip(ours, peer_rates)]
            target = TARGETS[args.size].get(clients)
            verdict = "" if target is None else (f">={target:g}x " + ("met" if statistics.median(ratios) >= target
                                                                      else "MISSED"))
            print(f"{endpoint:<11} {clients:>7} {statistics.median(peer_rates):>12.1f} "
                  f"{statistics.median(ours):>14.1f} {statistics.median(ratios):>13.2f}x "
                  f"{min(ratios):>5.2f}-{max(ratios):<5.2f} {verdict}")
    print(f"mean words per caption: peer {statistics.mean(words['peer']):.1f}, "
          f"mmdemo {statistics.mean(words['mmdemo']):.1f} (both stop at {args.max_new_tokens} tokens)")
    print("calls/s: medians over the rounds; ratio: per round, mmdemo's calls/s over the peer's measured just "
          "before or after it")


def _concurrency(settings: Settings) -> int:
    from mmdemo.placement import model_concurrency

    return model_concurrency(settings)


if __name__ == "__main__":
    sys.exit(main())
