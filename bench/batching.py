"""Throughput of the app's queue batching: 16 concurrent gradio_client clients on /caption, /zero_shot and
/transcribe (tiny only), the same load against the same app (``mmdemo serve`` in a process of its own)
with batching on (max batch 8) and off (max batch 1), side by side.

    python bench/batching.py                      # tiny models, then mid-size models (several minutes on CPU)
    python bench/batching.py --sizes tiny --clients 16 --requests 8

"mid" models are built here from the real configurations of BLIP base (Salesforce/blip-image-
captioning-base: ViT-B/16 at 384 px, BERT-base decoder) and CLIP ViT-B/32 (openai/clip-vit-base-patch32),
with random weights (the Hub is not needed), and registered through a user catalog file, as a user's
own model would be. Their tokenizers come from the tiny checkpoints (the architecture and the compute
per request are those of the real models; the vocabularies are small, the LM head keeps its real size).

Beside the app's ratio the table shows the model's own: the same requests through ``mmdemo.tasks``
in-process, one by one against batches of --max-batch (no gradio, no HTTP). That is the most batching
can give on this hardware; the app's ratio over it says how much of it the app keeps. On a CPU whose
cores a batch-1 forward pass already keeps busy (a vision encoder is compute-bound), it is far below 2x.

Every loop is bounded: requests per client, and --max-seconds per measurement.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from mmdemo.config import Settings  # noqa: E402
from mmdemo.tasks import build_tiny_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [ROOT / "assets" / name for name in ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")]
LABELS = "cat, dog, cup of coffee, astronaut, rocket, bicycle, tree, car"
SPEECH = ROOT / "assets" / "speech.wav"
MODELS = {  # endpoint -> model, per size (speech: tiny only; a random mid-size Whisper never stops talking)
    "tiny": {"/caption": "tiny-blip-caption", "/zero_shot": "tiny-clip", "/transcribe": "tiny-whisper"},
    "mid": {"/caption": "bench-blip-base", "/zero_shot": "bench-clip-b32"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_mid_models(tiny_dir: Path, out: Path) -> Path:
    """BLIP base and CLIP ViT-B/32 at their real sizes, random weights; returns a catalog file."""
    import torch
    from transformers import AutoProcessor, BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel

    torch.manual_seed(0)
    blip_dir, clip_dir = out / "blip-base", out / "clip-b32"
    if not (blip_dir / "config.json").exists():
        processor = AutoProcessor.from_pretrained(tiny_dir / "blip-caption")
        processor.image_processor.size = {"height": 384, "width": 384}
        tokenizer = processor.tokenizer
        ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                   eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
        model = BlipForConditionalGeneration(BlipConfig(text_config=ids)).eval()  # base sizes by default
        with torch.no_grad():  # random weights would stop at once or emit ids past the small vocabulary
            bias = model.text_decoder.cls.predictions.bias
            bias[len(tokenizer):] = -1e4
            bias[tokenizer.all_special_ids] = -20.0
        model.save_pretrained(blip_dir)
        processor.save_pretrained(blip_dir)
    if not (clip_dir / "config.json").exists():
        processor = AutoProcessor.from_pretrained(tiny_dir / "clip")
        processor.image_processor.size = {"shortest_edge": 224}
        processor.image_processor.crop_size = {"height": 224, "width": 224}
        tokenizer = processor.tokenizer
        text = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        CLIPModel(CLIPConfig(text_config=text)).eval().save_pretrained(clip_dir)  # ViT-B/32 by default
        processor.save_pretrained(clip_dir)
    catalog = out / "bench-catalog.toml"
    catalog.write_text(
        f'[models.bench-blip-base]\ntask = "image-to-text"\nkind = "blip"\nsource = "local-dir:{blip_dir}"\n'
        'params_m = 247\ndescription = "BLIP base architecture, random weights (benchmark)"\n\n'
        f'[models.bench-clip-b32]\ntask = "zero-shot-image-classification"\nkind = "clip"\n'
        f'source = "local-dir:{clip_dir}"\nparams_m = 151\n'
        'description = "CLIP ViT-B/32 architecture, random weights (benchmark)"\n'
    )
    return catalog


def endpoint_inputs(endpoint: str, n: int) -> list:
    """The positional inputs of one call: media (and labels for zero-shot)."""
    if endpoint == "/transcribe":
        return [handle_file(SPEECH)]
    image = handle_file(IMAGES[n % len(IMAGES)])
    return [image, LABELS] if endpoint == "/zero_shot" else [image]


def drive(handles: list, call: Callable[[Any, int], Any], requests: int, max_seconds: float) -> tuple[list, float]:
    """Each of ``handles`` (a client) in a thread of its own makes ``requests`` calls one after another,
    ``call(handle, n)``, until ``max_seconds`` have passed. Returns ``(latency, answer)`` per call and the
    wall time of the whole."""
    deadline = time.monotonic() + max_seconds
    answers: list[tuple[float, Any]] = []
    lock = threading.Lock()

    def one_client(index: int) -> None:
        for n in range(requests):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            answer = call(handles[index], index + n)
            with lock:
                answers.append((time.perf_counter() - started, answer))

    started = time.perf_counter()
    with ThreadPoolExecutor(len(handles)) as pool:
        list(pool.map(one_client, range(len(handles))))
    return answers, time.perf_counter() - started


def load(url: str, endpoint: str, model: str, clients: int, requests: int, max_seconds: float) -> dict:
    """``clients`` threads, each with its own client, each sending ``requests`` calls one after another."""
    handles = [Client(url, verbose=False) for _ in range(clients)]
    answers, seconds = drive(handles, lambda client, n: client.predict(*endpoint_inputs(endpoint, n), model=model,
                                                                       api_name=endpoint)[-1], requests, max_seconds)
    batches = [details["batch"] for _, details in answers]
    latencies = [latency for latency, _ in answers]
    return {"requests": len(answers), "seconds": seconds, "throughput": len(answers) / seconds,
            "mean_batch": statistics.mean(batches) if batches else 0.0,
            "p50_latency": statistics.median(latencies) if latencies else 0.0}


ENDPOINT_TASKS = {"/caption": "image-to-text", "/zero_shot": "zero-shot-image-classification",
                  "/transcribe": "automatic-speech-recognition"}


def model_ceiling(settings: Settings, endpoint: str, model: str, requests: int, max_batch: int,
                  rounds: int = 3) -> float:
    """Throughput of ``requests`` requests run in batches of ``max_batch`` over one by one, in-process: the
    median ratio of ``rounds`` rounds, each timing both ways back to back (so both see the same machine)."""
    from PIL import Image

    from mmdemo import tasks
    from mmdemo.tasks import open_registry

    registry = open_registry(settings)
    if endpoint == "/transcribe":
        batch = [dict(audio=str(SPEECH)) for _ in range(requests)]
    else:
        extra = {"labels": LABELS} if endpoint == "/zero_shot" else {}
        images = [Image.open(path).convert("RGB") for path in IMAGES]
        batch = [dict(image=images[n % len(images)], **extra) for n in range(requests)]
    task = ENDPOINT_TASKS[endpoint]

    def one_by_one() -> float:
        started = time.perf_counter()
        for inputs in batch:
            tasks.run(registry, task, model, **inputs)
        return time.perf_counter() - started

    def batched() -> float:
        started = time.perf_counter()
        for first in range(0, requests, max_batch):
            tasks.run_batch(registry, task, model, batch[first:first + max_batch])
        return time.perf_counter() - started

    try:
        tasks.run(registry, task, model, **batch[0])  # load and warm up both paths
        tasks.run_batch(registry, task, model, batch[:max_batch])
        return statistics.median(one_by_one() / batched() for _ in range(rounds))
    finally:
        registry.unload_all()


def serve(settings: Settings, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    """``mmdemo serve`` in a process of its own, as deployed: the clients' threads do not share its GIL."""
    port = free_port()
    command = [sys.executable, "-m", "mmdemo", "serve", "--profile", settings.profile, "--device", settings.device,
               "--data-dir", str(settings.data_dir), "--port", str(port), "--max-batch", str(max_batch),
               "--max-queue", str(max_queue)]
    if settings.catalog:
        command += ["--catalog", str(settings.catalog)]
    if settings.concurrency:
        command += ["--concurrency", str(settings.concurrency)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    wait_until_serving(process, url, "mmdemo serve")
    return process, url


def wait_until_serving(process: subprocess.Popen, url: str, what: str, seconds: float = 120) -> None:
    """Return once ``url`` answers 200; raise if ``process`` exits first or ``seconds`` pass (then kill it)."""
    deadline = time.monotonic() + seconds
    while True:  # bounded by the deadline
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{what} did not start in {seconds:g} s")
        time.sleep(0.1)


def measure(settings: Settings, size: str, max_batch: int, args: argparse.Namespace) -> dict[str, dict]:
    """One app with ``max_batch``; each endpoint warmed up (model loaded), then loaded by the clients."""
    process, url = serve(settings, max_batch, max(64, args.clients * 2))
    results = {}
    try:
        warm = Client(url, verbose=False)
        for endpoint, model in MODELS[size].items():
            warm.predict(*endpoint_inputs(endpoint, 0), model=model, api_name=endpoint)
        requests = args.requests if size == "tiny" else max(1, args.requests // 4)
        for endpoint, model in MODELS[size].items():
            results[endpoint] = load(url, endpoint, model, args.clients, requests, args.max_seconds)
    finally:
        stop(process)
    return results


def stop(process: subprocess.Popen) -> None:
    """Terminate a server process; kill it if it has not exited after 30 s."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,mid", help="tiny, mid or both (comma separated)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="per client (mid models: a quarter of it)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300, help="bound of each measurement")
    parser.add_argument("--concurrency", type=int, default=0, help="model calls at once (0: the app's default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmdemo-bench-") as tmp:
        base = Settings(profile="tiny", data_dir=Path(tmp) / "data", device="cpu", concurrency=args.concurrency)
        build_tiny_models(base.tiny_dir)
        rows = []
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            settings = base
            if size == "mid":
                settings = base.replace(catalog=build_mid_models(base.tiny_dir, Path(tmp) / "mid"))
            on = measure(settings, size, args.max_batch, args)
            off = measure(settings, size, 1, args)
            for endpoint, model in MODELS[size].items():
                ceiling = model_ceiling(settings, endpoint, model, 2 * args.max_batch, args.max_batch)
                rows.append((size, endpoint, on[endpoint], off[endpoint], ceiling))
    import torch

    from mmdemo.placement import model_concurrency

    print(f"\n{args.clients} concurrent clients; device cpu ({torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores); model calls at once: {model_concurrency(base)}")
    print(f"{'models':<6} {'endpoint':<11} {'batched req/s':>13} {'mean batch':>10} {'unbatched req/s':>15} "
          f"{'ratio':>6} {'model alone':>11}  {'p50 latency on/off (s)':>22}")
    for size, endpoint, on, off, ceiling in rows:
        ratio = on["throughput"] / off["throughput"] if off["throughput"] else float("nan")
        print(f"{size:<6} {endpoint:<11} {on['throughput']:>13.2f} {on['mean_batch']:>10.1f} "
              f"{off['throughput']:>15.2f} {ratio:>5.2f}x {ceiling:>10.2f}x  {on['p50_latency']:>10.2f} / "
              f"{off['p50_latency']:<9.2f}  ({on['requests']} / {off['requests']} requests)")
    print("model alone: the same model through mmdemo.tasks in-process, batches of "
          f"{args.max_batch} over one by one: what batching can give on this hardware")


if __name__ == "__main__":
    sys.exit(main())
