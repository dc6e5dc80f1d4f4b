"""Build and serve the web app (``python app.py`` / ``mmdemo serve``).

>>> demo = build_app(Settings(profile="tiny"))        # nothing is loaded yet
>>> launch(demo, settings, prevent_thread_lock=True)   # what serve() does, for tests

Configuration comes from :class:`~mmdemo.config.Settings` (flags and ``MMDEMO_*`` variables): host,
port, root path, model concurrency, queue size, batch size, login file, models to preload, feedback
database, shutdown grace period.

``/livez``, ``/readyz`` and ``/metrics`` are answered in front of gradio (:mod:`mmdemo.ops`). On SIGTERM
(or Ctrl-C) :func:`serve` drains: ``/readyz`` fails and new calls are refused at once, running and
queued calls finish within ``MMDEMO_SHUTDOWN_GRACE_S``, recorded results are flushed, the store is synced to
``MMDEMO_SYNC_REPO`` (when set, :mod:`mmdemo.sync`) and closes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

from .application import App
from .auth import AuthFile
from .config import Settings
from .errors import MMDemoError
from .ops import OpsEndpoints, Operations, messages_sent, queue_idle
from .registry import ModelRegistry
from .security import Gatekeeper, RequestGuard, parse_cookies

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

RESULT_DELIVERY_S = 5.0  # at shutdown, how long finished calls' results may take to reach connected clients


def build_app(settings: Settings, registry: ModelRegistry | None = None, *,
              auth: AuthFile | None = None) -> "gr.Blocks":
    """The web UI over a new :class:`~mmdemo.application.App` (:meth:`App.build <mmdemo.application.App.build>`:
    ``registry``, a new one for ``settings`` by default; ``auth``, ``settings.auth_file``'s users by default),
    its queue configured. Loads no model, opens no feedback store (the first result does), imports no torch.
    """
    return build_ui(App.build(settings, registry, auth))


def build_ui(app: App) -> "gr.Blocks":
    """The web UI over ``app`` (all tabs, the Models panel, the queue)."""
    from .ui.app import build_blocks

    return build_blocks(app)


def listen_address(settings: Settings, environ: dict[str, str] | None = None) -> tuple[str, int]:
    """``settings``' host and port. Where only gradio's own variables are set (a Hugging Face Space sets
    GRADIO_SERVER_NAME=0.0.0.0), those apply."""
    environ = dict(os.environ if environ is None else environ)
    host, port = settings.host, settings.port
    if "MMDEMO_HOST" not in environ and environ.get("GRADIO_SERVER_NAME") and host == Settings.host:
        host = environ["GRADIO_SERVER_NAME"]
    if "MMDEMO_PORT" not in environ and environ.get("GRADIO_SERVER_PORT") and port == Settings.port:
        port = int(environ["GRADIO_SERVER_PORT"])
    return host, port


def launch_options(settings: Settings, auth: AuthFile | None = None, gate: Gatekeeper | None = None,
                   ops: Operations | None = None) -> dict[str, Any]:
    """``Blocks.launch`` keyword arguments for ``settings`` (theme and CSS go to launch in gradio 6).

    ``auth`` defaults to ``settings.auth_file``'s users, as in :func:`build_app`; ``gate`` (the app
    context's, normally) to a new one over them. The request guard goes in front of gradio as middleware,
    and behind it the health and metrics endpoints of ``ops`` (the app context's) when given.
    """
    from .ui.app import CSS, theme
    from .ui.widgets import ASSETS_DIR

    if gate is None:
        if auth is None and settings.auth_file is not None:
            auth = AuthFile.load(settings.auth_file)
        gate = Gatekeeper(settings, auth)
    host, port = listen_address(settings)
    return dict(
        server_name=host,
        server_port=port,
        root_path=settings.root_path or None,
        auth=gate.check_login if gate.auth is not None else None,
        auth_message="Sign in to mmdemo." if gate.auth is not None else None,
        app_kwargs={"middleware": guard_middleware(gate, ops)},
        max_file_size=settings.max_upload_bytes,
        allowed_paths=[str(ASSETS_DIR)],
        theme=theme(),
        css=CSS,
        ssr_mode=False,  # no Node server next to Python
        run_history=False,  # gradio 6 would keep every run (inputs included) in the browser
        show_error=False,  # handlers turn errors into readable messages themselves
    )


def launch(demo: "gr.Blocks", settings: Settings, auth: AuthFile | None = None, **overrides: Any) -> tuple:
    """``demo.launch`` with ``settings``' options; ``overrides`` win (e.g. ``prevent_thread_lock=True``)."""
    ctx = getattr(demo, "mmdemo_context", None)
    gate = ctx.gate if ctx is not None and auth is None else None
    ops = ctx.ops if ctx is not None else None
    # uvicorn (started by gradio) replaces the peer with the X-Forwarded-For hop whenever the peer is in
    # FORWARDED_ALLOW_IPS (loopback by default): let it trust only our trusted proxies, as client_address does.
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(settings.trusted_proxies)
    return demo.launch(**{**launch_options(settings, auth, gate, ops), **overrides})


def guard_middleware(gate: Gatekeeper, ops: Operations | None = None) -> list:
    """The request guard (:class:`~mmdemo.security.RequestGuard`) as FastAPI middleware for ``gate``, then
    ``ops``' health and metrics endpoints (:class:`~mmdemo.ops.OpsEndpoints`) when given.

    :func:`launch` passes it in ``app_kwargs``; an app that mounts mmdemo does the same:
    ``ctx = demo.mmdemo_context; gr.mount_gradio_app(app, demo, "/", app_kwargs={"middleware":
    guard_middleware(ctx.gate, ctx.ops)})`` and runs uvicorn with ``forwarded_allow_ips`` set to
    MMDEMO_TRUSTED_PROXIES (uvicorn trusts loopback's X-Forwarded-For by default).
    """
    from starlette.middleware import Middleware

    middleware = [Middleware(RequestGuard, gate=gate, admin_only=is_feedback_export, username_of=gradio_username)]
    if ops is not None:
        middleware.append(Middleware(OpsEndpoints, ops=ops))
    return middleware


def is_feedback_export(route: str) -> bool:
    """A download of a feedback export: ``export_archive`` names them ``mmdemo-TASK-FORMAT-....zip``."""
    name = route.rsplit("/", 1)[-1]
    return name.startswith("mmdemo-") and name.endswith(".zip")


def gradio_username(scope: dict) -> str | None:
    """The login of a request, from gradio's session cookie (as gradio's own ``/user`` route reads it)."""
    app = scope.get("app")
    cookie_id, tokens = getattr(app, "cookie_id", None), getattr(app, "tokens", None)
    if cookie_id is None or not tokens:
        return None
    header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"cookie"), "")
    cookies = parse_cookies(header)
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token)


def admin_url(settings: Settings, gate: Gatekeeper) -> str:
    """The admin link to print at start-up (apps without a login file)."""
    host, port = listen_address(settings)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{settings.root_path.rstrip('/')}{gate.admin_path()}"


def preload_in_background(registry: ModelRegistry, model_ids: Iterable[str],
                          ops: Operations | None = None) -> threading.Thread:
    """Load models while the page is already up; a failure is logged and shown in the Models panel.
    ``ops`` (the app's) reports not ready until each is loaded, and a failed one for good."""
    model_ids = list(model_ids)
    if ops is not None:
        ops.preloading(model_ids)

    def work() -> None:
        for model_id in model_ids:
            error = None
            try:
                registry.preload([model_id])
            except MMDemoError as exc:
                log.error("preloading %s failed: %s", model_id, exc)
                error = str(exc)
            finally:
                if ops is not None:
                    ops.preloaded(model_id, error)

    thread = threading.Thread(target=work, name="mmdemo-preload", daemon=True)
    thread.start()
    return thread


def open_feedback_store(ctx: App) -> None:
    """Open (and check) the feedback store before the app serves anyone. A store that is there but
    unusable (an empty or damaged database file, another application's database, its media folder
    missing) raises :class:`~mmdemo.feedback.UnusableStoreError`: serving would lose records. A database
    that cannot be reached now is logged; the app serves, and tries again when feedback comes."""
    from .feedback import UnusableStoreError

    try:
        ctx.open_store()
    except UnusableStoreError:
        raise
    except MMDemoError as exc:
        log.warning("the feedback store is unavailable for now (feedback is not saved until it is): %s", exc)


def follow_finetune_jobs(ctx: App) -> None:
    """Start the fine-tuning queue's watcher: after a restart, jobs that were waiting start, and models of
    jobs that finished meanwhile join the catalog, without waiting for an admin to open the panel."""
    try:
        ctx.finetune.follow()
    except Exception:  # noqa: BLE001 - logged; the panel tries again on first use
        log.exception("following the fine-tuning jobs failed")


def tidy_feedback_store_in_background(ctx: App) -> threading.Thread:
    """Open the feedback store if it is not open yet, then once: forget the outputs whose feedback
    window closed without feedback, and remove media files no output refers to."""

    def work() -> None:
        try:
            purged = ctx.store.purge_expired_outputs()
            swept = ctx.store.sweep_media()
        except Exception:  # noqa: BLE001 - logged; the app runs on, its feedback rows say when the store fails
            log.exception("tidying the feedback store failed")
            return
        log.info("feedback store: %d expired outputs purged, %d unused media files removed", purged, len(swept))
        follow_finetune_jobs(ctx)

    thread = threading.Thread(target=work, name="mmdemo-feedback-tidy", daemon=True)
    thread.start()
    return thread


def serve(settings: Settings, app: App | None = None) -> bool:
    """Check the feedback store, build the UI over ``app`` (default: :meth:`App.build
    <mmdemo.application.App.build>` for ``settings``) and serve it until SIGTERM or Ctrl-C, then drain (see
    :func:`drain`); meanwhile models in ``settings.preload`` load and the feedback store is tidied.
    True when every call finished within the grace period."""
    ctx = app or App.build(settings)
    registry = ctx.registry
    for model_id in settings.preload:
        registry.catalog.get(model_id)  # an unknown id fails now, not in the background
    if ctx.sync is not None:
        ctx.sync.restore_at_start()  # an empty local store gets the Hub repo's snapshot before it opens
    open_feedback_store(ctx)  # before serving: an unusable store stops here (the CLI prints why)
    demo = build_ui(ctx)
    if any(spec.source_scheme == "hf-hub" for spec in registry.catalog):
        registry.hub.check_in_background()  # the Models panel and the tabs then say which models can load
    if settings.preload:
        preload_in_background(registry, settings.preload, ctx.ops)
    tidy_feedback_store_in_background(ctx)
    if ctx.sync is not None:
        ctx.sync.start()  # every MMDEMO_SYNC_EVERY_MINUTES, and once more when the app closes
    ctx.defaults.start()  # each task's promoted default model, as the store says, followed every few seconds
    stop = stop_on_signals()
    launch(demo, settings, prevent_thread_lock=True)
    if ctx.gate.admin_link:
        print(f"No login file: to manage models, export feedback and fine-tune, open this admin link once "
              f"(it sets a cookie in that browser):\n    {admin_url(settings, ctx.gate)}", flush=True)
    while not stop.wait(0.5):
        pass
    return drain(demo, ctx, settings.shutdown_grace_s)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (instead of dying at once): :func:`serve` then drains."""
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        log.warning("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def drain(demo: "gr.Blocks", ctx: App, grace_s: float) -> bool:
    """Shut down without losing what was acknowledged: refuse new calls (``/readyz`` fails first), let the
    queued and running ones finish and reach their clients within ``grace_s``, record the results
    already answered, close the feedback store and the server. True when everything finished in time."""
    deadline = time.monotonic() + grace_s
    ctx.ops.start_draining()
    while not queue_idle(demo) and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = queue_idle(demo)
    # Results reach their clients through each session's stream; a client that went away never takes its own.
    delivery_deadline = min(deadline, time.monotonic() + RESULT_DELIVERY_S)
    while not messages_sent(demo) and time.monotonic() < delivery_deadline:
        time.sleep(0.05)
    if not finished:
        log.error("calls still running after the %.0f s grace period (MMDEMO_SHUTDOWN_GRACE_S) are cut off", grace_s)
    ctx.close(timeout=max(1.0, deadline - time.monotonic()))  # fine-tuning jobs go on; the next app follows them
    demo.close()
    log.warning("shut down %s", "cleanly" if finished else "after the grace period")
    return finished
