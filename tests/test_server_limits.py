"""The request guard in front of gradio, on ``mmdemo serve`` in a process of its own: oversized bodies are
refused with 413 before they are read (the server's memory stays flat), bodies without a Content-Length
are cut off at the limit, and the admin link printed at start-up sets the admin cookie."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
CHUNK = b"\0" * MB  # one chunk, sent again and again: the test itself stays small


def body(megabytes: int):
    for _ in range(megabytes):
        yield CHUNK


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_data_dir, tmp_path_factory):
    """``python -m mmdemo serve --profile tiny`` on a free port, with a data directory of its own; yields
    ``(url, process, printed lines)``."""
    data = tmp_path_factory.mktemp("served") / "data"
    data.mkdir()
    (data / "tiny-models").symlink_to(tiny_data_dir / "tiny-models", target_is_directory=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMDEMO_DATA_DIR": str(data), "MMDEMO_DEVICE": "cpu",
           "PYTHONUNBUFFERED": "1"}
    env.pop("MMDEMO_AUTH_FILE", None)
    log = (data / "serve.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "mmdemo", "serve", "--profile", "tiny", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "config", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("mmdemo serve did not start:\n" + (data / "serve.log").read_text())
        time.sleep(0.5)
    yield url, process, (data / "serve.log")
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def post(url: str, megabytes: int, *, chunked: bool = False) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if not chunked:
        headers["content-length"] = str(megabytes * MB)
    return httpx.post(url, content=body(megabytes), headers=headers, timeout=120)


def test_32_bodies_of_100_mb_are_refused_before_they_are_read(server):
    url, process, _ = server
    routes = ["gradio_api/queue/join", "gradio_api/upload", "gradio_api/run/caption", "gradio_api/cancel"]
    rss = psutil.Process(process.pid).memory_info().rss
    post(url + routes[0], 100)  # warm up the route (imports, buffers) before measuring
    before = psutil.Process(process.pid).memory_info().rss
    statuses = [post(url + routes[i % len(routes)], 100).status_code for i in range(32)]
    grown = psutil.Process(process.pid).memory_info().rss - before
    assert statuses == [413] * 32
    assert grown < 100 * MB, f"the server grew by {grown / MB:.0f} MB (from {rss / MB:.0f} MB)"
    assert httpx.get(url + "config").status_code == 200  # and it answers on


def test_a_body_without_content_length_is_cut_off_at_the_limit(server):
    url, _, _ = server
    too_big = post(url + "gradio_api/queue/join", 100, chunked=True)  # model inputs: the upload bound
    assert too_big.status_code == 413 and "larger than this server accepts" in too_big.json()["detail"]
    assert post(url + "gradio_api/cancel", 100, chunked=True).status_code == 413  # others: the small bound
    assert post(url + "gradio_api/cancel", 2, chunked=True).status_code == 413  # 2 MiB > 1 MiB


def test_a_small_body_passes(server):
    url, _, _ = server
    response = httpx.post(url + "gradio_api/cancel", json={"session_hash": "x", "event_id": "y", "fn_index": 0})
    assert response.status_code != 413


def test_serve_prints_an_admin_link_that_sets_the_admin_cookie(server):
    url, _, log = server
    match = re.search(r"http://\S+/admin-login\?token=(\w+)", log.read_text())
    assert match, log.read_text()
    link = url + "admin-login?token=" + match.group(1)
    assert httpx.get(url + "admin-login?token=" + "0" * len(match.group(1))).status_code == 403
    opened = httpx.get(link)
    assert opened.status_code == 303 and opened.headers["location"] == "./"
    cookie = next(value for value in opened.headers.get_list("set-cookie") if value.startswith("mmdemo-admin="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    from gradio_client import Client

    anonymous = Client(url, verbose=False)
    assert "Read-only" in anonymous.predict(api_name="/models_status")[0]
    admin = Client(url, verbose=False, httpx_kwargs={"cookies": dict(opened.cookies)})
    assert "You are an admin here" in admin.predict(api_name="/models_status")[0]


def test_an_app_that_mounts_mmdemo_puts_the_same_guard_in_front(tiny_settings):
    """``gr.mount_gradio_app`` under one's own FastAPI app, with ``guard_middleware`` in ``app_kwargs``."""
    import gradio as gr
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from mmdemo.server import build_app, guard_middleware

    demo = build_app(tiny_settings)
    gate = demo.mmdemo_context.gate
    app = gr.mount_gradio_app(FastAPI(), demo, path="/demo", app_kwargs={"middleware": guard_middleware(gate)})
    with TestClient(app) as client:
        refused = client.post("/demo/gradio_api/queue/join", content=b"{}", headers={"content-length": str(10**9)})
        assert refused.status_code == 413
        opened = client.get("/demo" + gate.admin_path(), follow_redirects=False)
        assert opened.status_code == 303 and "mmdemo-admin" in opened.cookies
