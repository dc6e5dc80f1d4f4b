"""Operating the app: /livez, /readyz, /metrics (outside the queue), request ids and JSON logs, and a
graceful shutdown on SIGTERM (a real ``python -m mmdemo serve`` process)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from prometheus_client.parser import text_string_to_metric_families

from mmdemo.config import Settings
from mmdemo.feedback import FeedbackStore
from mmdemo.logs import JsonFormatter, RequestIdFilter
from mmdemo.server import preload_in_background

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "cat.jpg"
WAIT_S = 15.0


def wait_for(condition, timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """The app's /metrics parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    response = httpx.get(url.rstrip("/") + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def app(launch_app):
    return launch_app()


# --- probes ----------------------------------------------------------------------------------------------


def test_livez_and_readyz_answer_outside_the_queue_with_a_request_id(app):
    live = httpx.get(app.url + "livez")
    assert live.status_code == 200 and live.json() == {"live": True}
    assert len(live.headers["x-request-id"]) == 16
    ready = httpx.get(app.url + "readyz", headers={"X-Request-ID": "probe-1"})
    assert ready.status_code == 200 and ready.json() == {"ready": True, "reasons": []}
    assert ready.headers["x-request-id"] == "probe-1"  # a proxy's id is kept
    odd = httpx.get(app.url + "livez", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert odd.headers["x-request-id"] != "no spaces\tor tabs"


def test_readyz_fails_with_the_reason_while_the_store_is_down(launch_app):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = launch_app(database_url=f"postgresql+psycopg://mmdemo@127.0.0.1:{port}/mmdemo")
    response = httpx.get(down.url + "readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert len(body["reasons"]) == 1 and body["reasons"][0].startswith("feedback store: ")
    assert "not available" in body["reasons"][0] or "connect" in body["reasons"][0].lower()
    assert httpx.get(down.url + "livez").status_code == 200  # up, just not ready


def test_readyz_fails_until_preloaded_models_are_loaded(launch_app):
    starting = launch_app()
    registry, ops = starting.registry, starting.demo.mmdemo_context.ops
    may_load = threading.Event()
    real_preload = registry.preload

    def slow_preload(model_ids):  # the real load, once the test lets it start
        may_load.wait(WAIT_S)
        real_preload(model_ids)

    registry.preload = slow_preload
    preload_in_background(registry, ["tiny-blip-caption"], ops)
    response = httpx.get(starting.url + "readyz")
    assert response.status_code == 503 and response.json()["reasons"] == ["preloading tiny-blip-caption"]
    may_load.set()
    wait_for(lambda: httpx.get(starting.url + "readyz").status_code == 200, what="ready after preloading")
    assert registry.is_loaded("tiny-blip-caption")


# --- metrics ---------------------------------------------------------------------------------------------


def test_metrics_move_after_a_caption_call(app):
    before = scrape(app.url)
    client = Client(app.url, verbose=False)
    _, _, details = client.predict(handle_file(CAT), api_name="/caption")
    app.flush_records()
    client.predict(details["output_id"], thumbs="up", api_name="/feedback")
    after = scrape(app.url)
    labels = dict(task="image-to-text", model="tiny-blip-caption")
    assert sample(after, "mmdemo_requests_total", outcome="ok", **labels) == \
        sample(before, "mmdemo_requests_total", outcome="ok", **labels) + 1
    assert sample(after, "mmdemo_request_seconds_count", **labels) == \
        sample(before, "mmdemo_request_seconds_count", **labels) + 1
    assert sample(after, "mmdemo_batch_size_count", task="image-to-text") >= 1  # caption batches
    for kind in ("output", "feedback"):
        assert sample(after, "mmdemo_feedback_records_total", kind=kind) == \
            sample(before, "mmdemo_feedback_records_total", kind=kind) + 1
    assert sample(after, "mmdemo_models_loaded", device="cpu") >= 1
    assert sample(after, "mmdemo_model_memory_bytes", device="cpu") > 0
    assert ("mmdemo_queue_length", (("group", "models"),)) in after


def test_failed_calls_are_counted_as_errors(launch_app, broken_catalog):
    broken = launch_app(catalog=broken_catalog)
    client = Client(broken.url, verbose=False)
    with pytest.raises(Exception):  # noqa: B017 - the message is tested in test_app_api
        client.predict(handle_file(CAT), model="broken-caption", api_name="/caption")
    errors = sample(scrape(broken.url), "mmdemo_requests_total", task="image-to-text", model="broken-caption",
                    outcome="error")
    assert errors == 1


def test_metrics_need_the_token_when_one_is_set(launch_app):
    guarded = launch_app(metrics_token="s3cret-token")
    assert httpx.get(guarded.url + "metrics").status_code == 403
    assert httpx.get(guarded.url + "metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
    scrape(guarded.url, Authorization="Bearer s3cret-token")


def test_without_a_token_only_loopback_may_scrape(app):
    ops = app.demo.mmdemo_context.ops
    assert ops.may_scrape("127.0.0.1", None) and ops.may_scrape("::1", None)
    assert not ops.may_scrape("10.1.2.3", None) and not ops.may_scrape(None, None)


# --- logs ------------------------------------------------------------------------------------------------


class JsonLines(logging.Handler):
    """Keeps the JSON lines mmdemo's formatter writes."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def json_lines():
    handler = JsonLines()
    logger = logging.getLogger("mmdemo")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_json_log_lines_carry_the_request_id(app, json_lines):
    response = httpx.get(app.url + "admin-login?token=wrong", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 403 and response.headers["x-request-id"] == "req-42"
    line = next(line for line in json_lines.lines if "admin link with a wrong token" in line["message"])
    assert line["request_id"] == "req-42" and line["level"] == "WARNING" and line["logger"] == "mmdemo.security"
    assert line["time"].endswith("+00:00")


def test_a_queued_call_logs_with_the_id_of_the_request_that_queued_it(launch_app, broken_catalog, json_lines):
    broken = launch_app(catalog=broken_catalog)
    client = Client(broken.url, verbose=False, headers={"X-Request-ID": "queued-7"})
    with pytest.raises(Exception):  # noqa: B017 - the load fails; its log line is what is tested
        client.predict(handle_file(CAT), model="broken-caption", api_name="/caption")
    in_call = [line for line in json_lines.lines if line.get("request_id") == "queued-7"]
    assert in_call and any("broken-caption" in line["message"] for line in in_call), json_lines.lines


# --- draining and SIGTERM ----------------------------------------------------------------------------------


def test_draining_refuses_new_calls_with_a_clear_503(launch_app):
    draining = launch_app()
    draining.demo.mmdemo_context.ops.start_draining()
    ready = httpx.get(draining.url + "readyz")
    assert ready.status_code == 503 and ready.json()["reasons"] == ["shutting down"]
    join = httpx.post(draining.url + "gradio_api/queue/join", json={"data": [], "fn_index": 0})
    assert join.status_code == 503 and "shutting down" in join.json()["detail"]
    assert httpx.get(draining.url + "livez").status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FEEDBACK_WRITERS = 16


def save_until_refused(client: Client, output_id: str, writer: int, acknowledged: dict[int, str]) -> None:
    """Save feedback on ``output_id`` again and again until the server refuses; each acknowledged save's
    record id and comment go into ``acknowledged`` (a later save of the same record replaces it)."""
    for n in range(10_000):
        comment = f"writer {writer} save {n}"
        try:
            _, record_id = client.predict(output_id, thumbs="up", comment=comment, api_name="/feedback")
        except Exception:  # noqa: BLE001 - refused (shutting down) or gone: this writer stops
            return
        acknowledged[record_id] = comment


def test_sigterm_drains_finishes_the_running_call_keeps_feedback_and_exits_0(tiny_settings: Settings, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_settings.tiny_dir, data_dir / "tiny-models")
    port, grace = _free_port(), 60
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMDEMO_DATA_DIR": str(data_dir), "MMDEMO_DEVICE": "cpu",
           "MMDEMO_SHUTDOWN_GRACE_S": str(grace), "MMDEMO_LOG_FORMAT": "json", "MMDEMO_CONCURRENCY": "1"}
    server = subprocess.Popen([sys.executable, "-m", "mmdemo", "serve", "-v", "--profile", "tiny", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        def ready() -> bool:
            try:
                return httpx.get(url + "readyz").status_code == 200
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()
                return False

        wait_for(ready, timeout=120, what="the server to be ready")
        # Results are checked as the server sends them: a client that downloads the image files afterwards may
        # come after the drain's delivery window (RESULT_DELIVERY_S) on a loaded machine.
        client = Client(url, verbose=False, download_files=False)
        # 1. Feedback saved just before SIGTERM.
        _, _, details = client.predict(handle_file(CAT), api_name="/caption")
        wait_for(lambda: client.predict(details["output_id"], thumbs="up", comment="just before",
                                        api_name="/feedback"), what="feedback saved")
        writers = [Client(url, verbose=False) for _ in range(FEEDBACK_WRITERS)]
        writer_outputs = [writer.predict(handle_file(CAT), api_name="/caption")[2]["output_id"] for writer in writers]
        # 2. A slow call running when SIGTERM comes, and 16 clients saving feedback.
        slow = client.submit(prompt="a lighthouse", steps=60, seed=1, randomize_seed=False, api_name="/text_to_image")

        def denoising() -> bool:
            progress = slow.status().progress_data
            return bool(progress) and progress[0].desc == "Denoising"

        wait_for(denoising, timeout=120, what="the slow call to run (its model loaded)")
        assert sample(scrape(url), "mmdemo_queue_running", group="models") == 1
        acknowledged: dict[int, str] = {}
        saving = [threading.Thread(target=save_until_refused, args=(writer, output_id, index, acknowledged))
                  for index, (writer, output_id) in enumerate(zip(writers, writer_outputs))]
        for thread in saving:
            thread.start()
        wait_for(lambda: len(acknowledged) >= FEEDBACK_WRITERS // 2, what="feedback saves under way")
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        # 3. Not ready (and new calls refused) while the slow call still runs.
        wait_for(lambda: httpx.get(url + "readyz").status_code == 503, what="/readyz to fail")
        assert not slow.done()
        refused = httpx.post(url + "gradio_api/queue/join", json={"data": [], "fn_index": 0})
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        # 4. The running call completes; the process exits 0 within the grace period.
        for thread in saving:
            thread.join(grace)
        images, seed, _, slow_details = slow.result(timeout=grace)
        assert len(images) == 1 and slow_details["output_id"]
        _, stderr = server.communicate(timeout=grace)
        assert server.returncode == 0, stderr
        assert time.monotonic() - sent < grace
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    # 5. The log is JSON lines; it says the signal came. 6. Nothing acknowledged was lost.
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line["message"] == "SIGTERM received: shutting down" for line in lines)
    store = FeedbackStore(None, data_dir)
    try:
        saved = [record for record in store.iter_records() if record.output_id == details["output_id"]]
        assert [(record.thumbs, record.comment) for record in saved] == [(1, "just before")]
        assert store.get_output(slow_details["output_id"]).task == "text-to-image"
        stored = {record.id: record.comment for record in store.iter_records()}
        assert {record_id: stored.get(record_id) for record_id in acknowledged} == acknowledged
    finally:
        store.close()


def test_a_failed_preload_keeps_the_app_not_ready_with_the_reason(tiny_settings: Settings):
    from mmdemo.ops import Operations

    ops = Operations(tiny_settings, store_check=lambda: None)
    ops.preloading(["tiny-clip", "tiny-whisper"])
    assert ops.readiness() == ["preloading tiny-clip", "preloading tiny-whisper"]
    ops.preloaded("tiny-clip")
    ops.preloaded("tiny-whisper", error="its folder is missing")
    assert ops.readiness() == ["preloading tiny-whisper failed: its folder is missing"]


def test_unknown_log_format_is_refused():
    from mmdemo.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="log format 'xml'"):
        Settings.from_env({"MMDEMO_LOG_FORMAT": "xml"})


def test_the_endpoints_work_when_mmdemo_is_mounted_in_a_fastapi_app(tiny_settings: Settings, tmp_path):
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from mmdemo.server import build_app, guard_middleware

    settings = tiny_settings.replace(data_dir=tmp_path, catalog=None)
    shutil.copytree(tiny_settings.tiny_dir, settings.tiny_dir)
    demo = build_app(settings)
    ctx = demo.mmdemo_context
    outer = FastAPI()
    outer.get("/own")(lambda: {"own": True})
    app = gr.mount_gradio_app(outer, demo, path="/", app_kwargs={"middleware": guard_middleware(ctx.gate, ctx.ops)})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="uvicorn to start")
        url = f"http://127.0.0.1:{server.config.port}/"
        assert httpx.get(url + "own").json() == {"own": True}
        assert httpx.get(url + "livez").status_code == 200
        assert httpx.get(url + "readyz").json() == {"ready": True, "reasons": []}
        Client(url, verbose=False).predict(handle_file(CAT), api_name="/caption")
        metrics = scrape(url)
        assert sample(metrics, "mmdemo_requests_total", task="image-to-text", model="tiny-blip-caption",
                      outcome="ok") == 1
        assert ("mmdemo_queue_length", (("group", "models"),)) in metrics
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
