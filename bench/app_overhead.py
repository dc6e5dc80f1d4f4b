"""What the app adds to one request: ``/caption`` through gradio_client against the direct task call
(``mmdemo.tasks.run``) on the same loaded model, in the same run, interleaved.

    python bench/app_overhead.py                 # tiny captioner, 30 calls each way
    python bench/app_overhead.py --calls 50 --max-new-tokens 5
    python bench/app_overhead.py --photo-megapixels 12     # a new 12 MP photo in every call

The app path includes what a real client pays: uploading the image, validation before the queue
(decoding the image once more), the queue, the SSE stream and the JSON result. Recording the result for
feedback happens after the answer, in the background (with --photo-megapixels every photo is new, so
its media is encoded and stored each time, competing for the same cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradio_client import Client, handle_file  # noqa: E402

from mmdemo.config import Settings  # noqa: E402
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.server import build_app, launch  # noqa: E402
from mmdemo.tasks import run  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"
MODEL = "tiny-blip-caption"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gradio_floor(calls: int) -> list[float]:
    """The same upload + queue + result path through a gradio app that does nothing (ms per call)."""
    import gradio as gr

    with gr.Blocks() as echo_app:
        image, text = gr.Image(type="filepath"), gr.Textbox()
        gr.Button().click(lambda image: "done", image, text, api_name="echo", preprocess=False)
    _, url, _ = echo_app.queue().launch(prevent_thread_lock=True, quiet=True, server_port=free_port())
    client = Client(url, verbose=False)
    try:
        times = []
        for n in range(calls + 3):
            started = time.perf_counter()
            client.predict(handle_file(IMAGE), api_name="/echo")
            if n >= 3:
                times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        echo_app.close()


def new_photos(count: int, megapixels: float, folder: Path) -> list[Path]:
    """``count`` different JPEG photos of about ``megapixels`` (the cat, scaled, one pixel changed in each)."""
    from PIL import Image

    with Image.open(IMAGE) as cat:
        scale = (megapixels * 1e6 / (cat.width * cat.height)) ** 0.5
        big = cat.convert("RGB").resize((round(cat.width * scale), round(cat.height * scale)))
    paths = []
    for n in range(count):
        big.putpixel((n % big.width, 0), (n % 256, 0, 0))
        path = folder / f"photo-{n}.jpg"
        big.save(path, quality=90)
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30, help="calls each way (after 3 warm-up calls)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--photo-megapixels", type=float, default=0,
                        help="send a new photo of this size in every call (0: the same small photo)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmdemo-bench-") as tmp:
        settings = Settings(profile="tiny", data_dir=Path(tmp), device="cpu", port=free_port())
        registry = open_registry(settings)
        demo = build_app(settings, registry)
        _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False)
        photos = (new_photos(args.calls + 3, args.photo_megapixels, Path(tmp)) if args.photo_megapixels
                  else [IMAGE] * (args.calls + 3))
        try:
            model_ms: dict[str, list[float]] = {"app": [], "direct": []}

            def direct(image: Path) -> float:
                started = time.perf_counter()
                result = run(registry, "image-to-text", MODEL, image=image, max_new_tokens=args.max_new_tokens)
                model_ms["direct"].append(result["seconds"] * 1000)
                return time.perf_counter() - started

            def through_app(image: Path) -> float:
                started = time.perf_counter()
                *_, details = client.predict(handle_file(image), model=MODEL, max_new_tokens=args.max_new_tokens,
                                             api_name="/caption")
                model_ms["app"].append(details["seconds"] * 1000)
                return time.perf_counter() - started

            for image in photos[:3]:  # load the model, warm both paths
                direct(image), through_app(image)
            app_times, direct_times = [], []
            model_ms = {"app": [], "direct": []}
            for image in photos[3:]:  # interleaved, so both see the same machine state
                app_times.append(through_app(image))
                direct_times.append(direct(image))
        finally:
            demo.close()

    floor_ms = gradio_floor(args.calls)
    app_ms = [t * 1000 for t in app_times]
    direct_ms = [t * 1000 for t in direct_times]
    photo = f"a new {args.photo_megapixels:g} MP photo each call" if args.photo_megapixels else IMAGE.name
    print(f"\n/caption on {MODEL}, max_new_tokens={args.max_new_tokens}, {args.calls} calls each, one at a time, "
          f"{photo}")
    print(f"{'path':<22} {'median ms':>10} {'p90 ms':>8}")
    print(f"{'direct tasks.run':<22} {statistics.median(direct_ms):>10.1f} {percentile(direct_ms, 0.9):>8.1f}")
    print(f"{'app (gradio_client)':<22} {statistics.median(app_ms):>10.1f} {percentile(app_ms, 0.9):>8.1f}")
    print(f"{'gradio, doing nothing':<22} {statistics.median(floor_ms):>10.1f} {percentile(floor_ms, 0.9):>8.1f}"
          "   (upload + queue + result stream: gradio's own floor)")
    print(f"overhead of the app: {statistics.median(app_ms) - statistics.median(direct_ms):.1f} ms (median), "
          f"{percentile(app_ms, 0.9) - percentile(direct_ms, 0.9):.1f} ms (p90)")
    print(f"of which the model itself ran slower inside the server (sharing {os.cpu_count()} cores with the "
          f"server and the client): {statistics.median(model_ms['app']) - statistics.median(model_ms['direct']):.1f} ms"
          f" (median inference {statistics.median(model_ms['app']):.1f} ms in the app, "
          f"{statistics.median(model_ms['direct']):.1f} ms direct)")


if __name__ == "__main__":
    sys.exit(main())
