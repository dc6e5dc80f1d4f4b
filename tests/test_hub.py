"""Without the Hub: a Hub model that is not cached fails within seconds with a clear message, a cached
one loads from the local cache, the Hub is asked again after a while, and the app says which models can
load (issue 8, item 20).

The "Hub" here is a socket on this machine that accepts connections and never answers (as a firewalled
endpoint behaves), or a local HTTP server that answers; no request leaves the machine.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from mmdemo import tasks
from mmdemo.tasks import open_registry, task_catalog
from mmdemo.errors import ModelLoadError
from mmdemo.hub import PROBE_TIMEOUT_SECONDS, HubProbe, cached_snapshot
from mmdemo.registry import ModelRegistry

CAT = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"


@pytest.fixture
def online(monkeypatch):
    """The environment of a machine configured to use the Hub (the test session is offline by default)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def silent_hub():
    """An endpoint that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def answering_hub():
    """A local HTTP server that answers every request; ``.requests`` counts them."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.requests = requests
    yield server
    server.shutdown()


def default_registry(settings, hub: HubProbe) -> ModelRegistry:
    settings = settings.replace(profile="default")
    return open_registry(settings, task_catalog("default"), hub=hub)


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef") -> Path:
    """``folder`` as huggingface_hub's cache holds a download of ``repo_id`` (refs/main -> a snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_an_uncached_hub_model_fails_within_seconds_when_the_hub_is_silent(
        online, hub_cache, silent_hub, tiny_settings):
    registry = default_registry(tiny_settings, HubProbe(endpoint=silent_hub))
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        tasks.run(registry, "image-to-text", "blip-caption-base", image=str(CAT))
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"the failure took {elapsed:.1f} s"
    message = str(caught.value)
    assert "the Hub cannot be reached" in message and "not in the local cache" in message
    assert f"did not answer within {PROBE_TIMEOUT_SECONDS:g} s" in message
    assert "hf download Salesforce/blip-image-captioning-base" in message
    # The answer is remembered: the next model fails at once, without another probe.
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="the Hub cannot be reached"):
        tasks.run(registry, "zero-shot-image-classification", "clip-vit-base-patch32", image=str(CAT), labels="cat, dog")
    assert time.monotonic() - started < 1.0


def test_a_cached_hub_model_loads_from_the_cache_while_the_hub_is_silent(
        online, hub_cache, silent_hub, tiny_settings, tiny_data_dir):
    snapshot = put_in_cache(hub_cache, "Salesforce/blip-image-captioning-base", tiny_settings.tiny_dir / "blip-caption")
    assert cached_snapshot("Salesforce/blip-image-captioning-base") == snapshot
    registry = default_registry(tiny_settings, HubProbe(endpoint=silent_hub))
    spec = registry.catalog.get("blip-caption-base")
    assert registry.availability(spec) == "local"

    result = tasks.run(registry, "image-to-text", "blip-caption-base", image=str(CAT), max_new_tokens=5)
    assert isinstance(result["text"], str) and result["model"]["id"] == "blip-caption-base"
    assert registry.status()["loaded"][0]["id"] == "blip-caption-base"
    # Models that are not cached are marked unavailable now that the Hub is known to be silent.
    assert registry.availability(registry.catalog.get("clip-vit-base-patch32")) == "unavailable"


def test_cached_snapshot_follows_revisions(hub_cache, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    snapshot = put_in_cache(hub_cache, "openai/clip-vit-base-patch32", folder, commit="3d74acf0123")
    assert cached_snapshot("openai/clip-vit-base-patch32", "3d74acf") == snapshot  # a short commit
    assert cached_snapshot("openai/clip-vit-base-patch32") == snapshot  # refs/main
    assert cached_snapshot("openai/clip-vit-base-patch32", "other") is None
    assert cached_snapshot("openai/never-downloaded") is None


def test_the_hub_is_asked_again_after_a_while_and_nothing_switches_the_process_offline(
        online, monkeypatch, silent_hub, answering_hub):
    import os

    probe = HubProbe(timeout=0.5, ttl=1.0)  # the endpoint comes from HF_ENDPOINT, read at each probe
    monkeypatch.setenv("HF_ENDPOINT", silent_hub)
    state = probe.state()
    assert not state.reachable and "did not answer" in state.reason
    assert "HF_HUB_OFFLINE" not in os.environ

    monkeypatch.setenv("HF_ENDPOINT", answering_hub.url)
    assert not probe.state().reachable  # remembered within the ttl: not asked again
    assert answering_hub.requests == []
    time.sleep(1.1)
    assert probe.state().reachable
    assert answering_hub.requests == ["/api/models?limit=1"]


def test_offline_by_environment_makes_no_request(answering_hub):
    # conftest sets HF_HUB_OFFLINE=1 for the session, as the tiny profile does.
    state = HubProbe(endpoint=answering_hub.url).state()
    assert not state.reachable and state.reason == "HF_HUB_OFFLINE is set"
    assert answering_hub.requests == []


def test_the_app_says_so_in_the_tab_and_the_models_panel(online, hub_cache, silent_hub, tiny_settings):
    from mmdemo.server import build_app, launch
    from mmdemo.ui import models_panel
    from mmdemo.ui.common import model_note

    put_in_cache(hub_cache, "Salesforce/blip-image-captioning-base", tiny_settings.tiny_dir / "blip-caption")
    registry = default_registry(tiny_settings, HubProbe(endpoint=silent_hub))
    settings = registry.settings.replace(port=0)
    demo = build_app(settings, registry)
    try:
        _, url, _ = launch(demo, settings, server_port=None, prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False)
        started = time.monotonic()
        with pytest.raises(AppError, match="the Hub cannot be reached"):
            client.predict(image={"path": str(CAT), "meta": {"_type": "gradio.FileData"}},
                           model="blip-caption-large", api_name="/caption")
        assert time.monotonic() - started < 5.0

        ctx = demo.mmdemo_context
        rows = {row[0]: row[1] for row in models_panel.status_rows(ctx)}
        assert rows["blip-caption-base"] == "not loaded"
        assert rows["clip-vit-base-patch32"] == "unavailable"
        assert "The Hub cannot be reached" in models_panel.summary(ctx)
        assert "Not available here" in model_note(ctx, "clip-vit-base-patch32")
        assert "Not loaded yet" in model_note(ctx, "blip-caption-base")
    finally:
        demo.close()
