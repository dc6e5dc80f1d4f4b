"""mmdemo's gradio patches (mmdemo/ui/gradio_patches.py): each is still needed, still fits, and is applied by the
app builder only.

Each patch has a test that runs gradio *unpatched* and expects its bug: when a gradio upgrade fixes it, that
test fails and says the patch can go. Another runs it patched and expects the fix: when an upgrade changes
the patched function, that one fails.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import gradio.queueing
import pytest
from gradio_client import Client

from mmdemo.ui import gradio_patches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def patched() -> None:
    assert gradio_patches.install()


def unpatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """gradio as installed, for this test: the patched functions put back."""
    gradio_patches.install()
    monkeypatch.setattr(gradio.queueing, "create_validator_fn", gradio.queueing.create_validator_fn.__wrapped__)
    monkeypatch.setattr(gradio.queueing.Queue, "push", gradio.queueing.Queue.push.__wrapped__)


def launched(demo: gr.Blocks) -> Client:
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    return Client(url, verbose=False)


# --- validate_single_requests ----------------------------------------------------------------------------


def batched_app_with_validator() -> gr.Blocks:
    """A batched event with two inputs and a validator, as mmdemo's batched tabs have."""

    def add(first: list[float], second: list[float]) -> list[list[float]]:
        return [[a + b for a, b in zip(first, second)]]

    def validate(first: float, second: float) -> list[dict]:
        return [gr.validate(first >= 0, "first must be >= 0"), gr.validate(True, "")]

    with gr.Blocks() as demo:
        first, second, total = gr.Number(), gr.Number(), gr.Number()
        gr.Button().click(add, [first, second], [total], api_name="add", batch=True, max_batch_size=4,
                          validator=validate)
    return demo.queue()


def test_unpatched_gradio_still_runs_a_batched_events_validator_batched(monkeypatch):
    """The bug validate_single_requests works around: if this fails, gradio fixed it; remove the patch."""
    unpatched(monkeypatch)
    demo = batched_app_with_validator()
    try:
        client = launched(demo)
        with pytest.raises(Exception, match="400 Bad Request"):  # the validator fails before it is called
            client.predict(1, 2, api_name="/add")
    finally:
        demo.close()


def test_patched_gradio_validates_one_request_of_a_batched_event(patched):
    demo = batched_app_with_validator()
    try:
        client = launched(demo)
        assert client.predict(1, 2, api_name="/add") == 3
        with pytest.raises(Exception, match="first must be >= 0"):
            client.predict(-1, 2, api_name="/add")
    finally:
        demo.close()


# --- bound_queue_groups ----------------------------------------------------------------------------------


def app_with_a_bounded_group(release: threading.Event) -> gr.Blocks:
    """One slow event in group 'models' (one at a time, one may wait) and the whole queue far from full."""

    def slow(x: float) -> float:
        release.wait(60)
        return x

    with gr.Blocks() as demo:
        number = gr.Number()
        gr.Button().click(slow, [number], [number], api_name="slow", concurrency_id="models", concurrency_limit=1)
    demo.mmdemo_queue_limits = {"models": 1}
    return demo.queue(max_size=20)


def refused_of_three(demo: gr.Blocks, release: threading.Event) -> int:
    """Three calls to the slow event (one runs, one waits, the third finds the group full): how many were refused."""
    client = launched(demo)
    jobs = [client.submit(1, api_name="/slow")]
    deadline = time.monotonic() + 30
    while not any(demo._queue.active_jobs) and time.monotonic() < deadline:
        time.sleep(0.02)
    jobs.append(client.submit(2, api_name="/slow"))
    while len(demo._queue) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    jobs.append(client.submit(3, api_name="/slow"))
    refused = 0
    try:
        jobs[2].result(timeout=5)
    except Exception as exc:  # noqa: BLE001 - refused (queue full), or still waiting behind the others
        refused = int("queue is full" in str(exc).lower())
    release.set()
    for job in jobs:
        try:
            job.result(timeout=30)
        except Exception:  # noqa: BLE001 - the refused one
            pass
    return refused


def test_unpatched_gradio_still_bounds_only_the_whole_queue(monkeypatch):
    """The limit bound_queue_groups adds: if this fails, gradio bounds concurrency groups itself; remove it."""
    unpatched(monkeypatch)
    release = threading.Event()
    demo = app_with_a_bounded_group(release)
    try:
        assert refused_of_three(demo, release) == 0
    finally:
        release.set()
        demo.close()


def test_patched_gradio_refuses_a_call_that_finds_its_group_full(patched):
    release = threading.Event()
    demo = app_with_a_bounded_group(release)
    try:
        assert refused_of_three(demo, release) == 1
    finally:
        release.set()
        demo.close()


# --- what the patches replace, and when they are applied --------------------------------------------------


def test_the_patched_functions_still_look_as_they_did():
    """The patches wrap these with the same signature: a gradio that renames or reshapes them breaks them."""
    gradio_patches.install()
    create = gradio.queueing.create_validator_fn.__wrapped__
    push = gradio.queueing.Queue.push.__wrapped__
    assert list(inspect.signature(create).parameters) == ["fn"]
    assert list(inspect.signature(push).parameters) == ["self", "body", "request", "username"]
    assert inspect.iscoroutinefunction(push)
    assert "event_queue_per_concurrency_id" in inspect.getsource(gradio.queueing.Queue)
    assert gradio.__version__ in gradio_patches.FOR_GRADIO


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_importing_the_ui_patches_nothing_and_building_the_app_does(tmp_path):
    ran = run_fresh(f"""
import gradio.queueing as q
import mmdemo.ui.app
assert not hasattr(q.create_validator_fn, "__wrapped__"), "patched at import"
from mmdemo.config import Settings
from mmdemo.server import build_app
build_app(Settings(profile="tiny", data_dir={str(tmp_path)!r}))
assert q.create_validator_fn.__wrapped__ and q.Queue.push.__wrapped__
""")
    assert ran.returncode == 0, ran.stderr[-2000:]


def test_an_unchecked_gradio_version_is_not_patched_and_says_so():
    ran = run_fresh("""
import warnings
import gradio.queueing as q
from mmdemo.ui import gradio_patches
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert gradio_patches.install("99.0.0") is False
assert not hasattr(q.create_validator_fn, "__wrapped__") and not hasattr(q.Queue.push, "__wrapped__")
assert any(issubclass(w.category, gradio_patches.UncheckedGradioWarning) and "99.0.0" in str(w.message)
           for w in caught), [str(w.message) for w in caught]
""")
    assert ran.returncode == 0, ran.stderr[-2000:]
