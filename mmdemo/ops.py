"""Operating a running app: health probes, Prometheus metrics and draining before a shutdown.

* ``/livez``: 200 while the process serves HTTP.
* ``/readyz``: 200 when the feedback store answers, the models to preload are loaded and the app is not
  draining; else 503 with the reasons (JSON ``{"ready": false, "reasons": [...]}``).
* ``/metrics``: the Prometheus text format. Open to loopback clients; others need
  ``Authorization: Bearer <MMDEMO_METRICS_TOKEN>`` (without a token set, only loopback may scrape).

:class:`OpsEndpoints` is the ASGI middleware that answers these paths itself, before gradio and outside
its queue, so it works the same under ``demo.launch()`` and ``gr.mount_gradio_app`` (it travels in the
same middleware list as the request guard, see ``mmdemo.server.guard_middleware``). While draining, it
refuses new model calls (queue joins) with a 503 that says why.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .config import Settings
from .errors import MMDemoError
from .security import ASGIApp, Visitor, _plain, _route_path

log = logging.getLogger(__name__)

LIVE_PATH, READY_PATH, METRICS_PATH = "/livez", "/readyz", "/metrics"
# Routes that start a model call (or any queued event): refused while draining.
CALL_ROUTES = ("/gradio_api/queue/join", "/gradio_api/run/", "/gradio_api/api/", "/gradio_api/call/")
DRAINING_MESSAGE = "This server is shutting down and takes no new requests; please try again in a moment."
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmdemo_requests", "Model calls, by task, model and outcome (ok, error)",
                                ["task", "model", "outcome"], registry=self.registry)
        self.latency = Histogram("mmdemo_request_seconds", "Time a model call (or the batch it ran in) took",
                                 ["task", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mmdemo_batch_size", "Requests per batch formed by the queue", ["task"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.records = Counter("mmdemo_feedback_records", "Records written to the feedback store, by kind "
                               "(output: a result recorded for rating; feedback: a rating or correction)",
                               ["kind"], registry=self.registry)
        self._collectors: dict[str, Callable[[], Iterable[GaugeMetricFamily]]] = {}
        self.registry.register(_Collector(self._collectors))

    def set_gauges(self, name: str, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Gauges read at each scrape (queue lengths, loaded models); ``name`` replaces earlier ones."""
        self._collectors[name] = collect

    @contextlib.contextmanager
    def timed(self, task: str, model_ids: Sequence[str | None]) -> Iterator[None]:
        """Count and time the model calls of ``model_ids`` (one per request; several for a batch)."""
        start = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            elapsed = time.perf_counter() - start
            for model_id in model_ids:
                model = model_id or "default"
                self.requests.labels(task, model, outcome).inc()
                self.latency.labels(task, model).observe(elapsed)

    def recorded(self, kind: str) -> None:
        self.records.labels(kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, collectors: dict[str, Callable[[], Iterable[GaugeMetricFamily]]]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for collect in list(self._collectors.values()):
            try:
                yield from collect()
            except Exception:  # noqa: BLE001 - a scrape never fails because one gauge could not be read
                log.exception("reading a metric failed")


def registry_gauges(registry: Any) -> Callable[[], list[GaugeMetricFamily]]:
    """Models loaded and their memory, per device, from a :class:`~mmdemo.registry.ModelRegistry`'s status."""

    def collect() -> list[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("mmdemo_models_loaded", "Models loaded, per device", labels=["device"])
        memory = GaugeMetricFamily("mmdemo_model_memory_bytes", "Estimated memory of the loaded models, per device",
                                   labels=["device"])
        per_device: dict[str, list[int]] = {}
        for model in registry.status()["loaded"]:
            per_device.setdefault(str(model["device"]), []).append(int(model["memory_bytes"] or 0))
        for device, sizes in sorted(per_device.items()):
            loaded.add_metric([device], len(sizes))
            memory.add_metric([device], sum(sizes))
        return [loaded, memory]

    return collect


def queue_gauges(blocks: Any) -> Callable[[], list[GaugeMetricFamily]]:
    """Requests waiting and running per queue group (gradio's concurrency ids) of a launched ``gr.Blocks``."""

    def collect() -> list[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("mmdemo_queue_length", "Requests waiting in the queue, per group", labels=["group"])
        running = GaugeMetricFamily("mmdemo_queue_running", "Requests running, per group", labels=["group"])
        for group, event_queue in list(blocks._queue.event_queue_per_concurrency_id.items()):
            waiting.add_metric([group], len(event_queue.queue))
            running.add_metric([group], event_queue.current_concurrency)
        return [waiting, running]

    return collect


def queue_idle(blocks: Any) -> bool:
    """Nothing waits in ``blocks``' queue and nothing runs."""
    return len(blocks._queue) == 0 and blocks._queue.get_active_worker_count() == 0


def messages_sent(blocks: Any) -> bool:
    """Every message of ``blocks``' queue (results included) was taken by its client's stream."""
    return all(messages.empty() for messages in list(blocks._queue.pending_messages_per_session.values()))


class Operations:
    """Health and draining state of one app, and its metrics.

    ``store_check()`` raises when the feedback store cannot be used (its message is the reason shown).
    """

    def __init__(self, settings: Settings, store_check: Callable[[], None]) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._store_check = store_check
        self._lock = threading.Lock()
        self._preloading: list[str] = []
        self._preload_errors: dict[str, str] = {}
        self._draining = threading.Event()
        self._checks: list[Callable[[], str | None]] = []

    # -- state --

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start_draining(self) -> None:
        """From now on ``/readyz`` fails and new model calls are refused."""
        self._draining.set()

    def add_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns a reason why the app is not ready (None: no objection); ``/readyz`` asks it."""
        self._checks.append(check)

    def preloading(self, model_ids: Iterable[str]) -> None:
        """These models are being preloaded: not ready until each is loaded (or failed)."""
        with self._lock:
            self._preloading.extend(model_ids)

    def preloaded(self, model_id: str, error: str | None = None) -> None:
        with self._lock:
            if model_id in self._preloading:
                self._preloading.remove(model_id)
            if error is not None:
                self._preload_errors[model_id] = error

    def readiness(self) -> list[str]:
        """Why the app should get no traffic now (empty: ready). Blocks while the store is asked."""
        reasons = []
        if self.draining:
            reasons.append("shutting down")
        with self._lock:
            reasons += [f"preloading {model_id}" for model_id in self._preloading]
            reasons += [f"preloading {model_id} failed: {error}" for model_id, error in self._preload_errors.items()]
        reasons += [reason for reason in (check() for check in self._checks) if reason]
        try:
            self._store_check()
        except MMDemoError as exc:
            reasons.append(f"feedback store: {exc}")
        except Exception as exc:  # noqa: BLE001 - a probe reports, it does not crash
            reasons.append(f"feedback store: {type(exc).__name__}")
        return reasons

    def may_scrape(self, address: str | None, authorization: str | None) -> bool:
        """``/metrics`` is for the configured bearer token, else for loopback clients only."""
        token = self.settings.metrics_token
        if token:
            return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
        try:
            return address is not None and ipaddress.ip_address(address).is_loopback
        except ValueError:
            return False


class OpsEndpoints:
    """ASGI middleware: ``/livez``, ``/readyz`` and ``/metrics`` answered here (never queued), and new
    model calls refused with 503 while draining. Put it after the request guard, which finds the client
    address it uses."""

    def __init__(self, app: ASGIApp, *, ops: Operations) -> None:
        self.app, self.ops = app, ops

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_path(scope).rstrip("/") or "/"
        if route == LIVE_PATH:
            await _json(send, 200, {"live": True})
        elif route == READY_PATH:
            import anyio.to_thread

            reasons = await anyio.to_thread.run_sync(self.ops.readiness)
            await _json(send, 503 if reasons else 200, {"ready": not reasons, "reasons": reasons})
        elif route == METRICS_PATH:
            await self._metrics(scope, send)
        elif self.ops.draining and scope.get("method") == "POST" and route.startswith(CALL_ROUTES):
            await _plain(send, 503, DRAINING_MESSAGE, [(b"retry-after", b"5")])
        else:
            await self.app(scope, receive, send)

    async def _metrics(self, scope: dict, send: Callable) -> None:
        visitor = (scope.get("state") or {}).get("mmdemo_visitor")  # set by the request guard
        address = visitor.address if isinstance(visitor, Visitor) else (scope.get("client") or (None,))[0]
        authorization = next((value.decode("latin-1") for name, value in scope["headers"]
                              if name == b"authorization"), None)
        if not self.ops.may_scrape(address, authorization):
            await _plain(send, 403, "Metrics are open to this machine only, or to a scraper holding "
                                    "MMDEMO_METRICS_TOKEN (Authorization: Bearer ...).")
            return
        gradio_app = scope.get("app")  # Starlette sets it: gradio's App, under launch() or mounted
        if hasattr(gradio_app, "get_blocks"):
            self.ops.metrics.set_gauges("queue", queue_gauges(gradio_app.get_blocks()))
        body = self.ops.metrics.exposition()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _json(send: Callable, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
