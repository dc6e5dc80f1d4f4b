"""The composition root: :class:`App`, everything a running mmdemo shares, built in one place.

>>> app = App.build(Settings(profile="tiny"))   # no model loaded, no store opened, no gradio imported
>>> app.registry.status(); app.store; predict(app.registry, ..., record=app.recorder_for(request))

The web UI (``mmdemo.ui``, which takes an ``App``), the CLI (``mmdemo serve``) and tests build it with
:meth:`App.build` and hand it on; nothing here imports gradio or torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .auth import AuthFile
from .config import Settings, apply_environment
from .errors import MMDemoError, NotAllowedError
from .finetune.control import JobControl
from .ops import Operations, registry_gauges
from .placement import model_concurrency
from .promotion import ModelDefaults
from .registry import ModelRegistry
from .tasks import open_registry
from .security import Gatekeeper, visitor_of
from .sync import HubSync

if TYPE_CHECKING:
    from .feedback import FeedbackStore
    from .tasks import Prediction, Record
    from .feedback.recorder import BackgroundRecorder

log = logging.getLogger(__name__)

OUTPUT_RETENTION_SECONDS = 3600  # generated files older than this are deleted when new ones are written
STORE_RETRY_SECONDS = 30.0  # after the feedback store failed to open, calls wait this long before trying again


@dataclass
class App:
    """Settings, the registry (the only owner of models), the feedback store and its recorder, login and
    roles, limits, health and metrics, the fine-tuning jobs and the promoted default models."""

    settings: Settings
    registry: ModelRegistry
    auth: AuthFile | None = None
    hub_api: Any = field(default=None, repr=False)  # for the store's Hub sync: an HfApi or a stand-in (tests)
    concurrency: int = field(init=False)  # model calls at once
    gate: Gatekeeper = field(init=False, repr=False)  # cookies, client addresses, login back-off, body limits
    ops: Operations = field(init=False, repr=False)  # health, metrics, draining (see mmdemo.ops)
    finetune: JobControl = field(init=False, repr=False)  # start, follow and cancel fine-tuning jobs
    defaults: ModelDefaults = field(init=False, repr=False)  # each task's promoted default model (the store's)
    sync: HubSync | None = field(init=False, repr=False)  # the store's sync to MMDEMO_SYNC_REPO, when set
    _output_dir: Path | None = field(default=None, init=False, repr=False)
    _store: "FeedbackStore | None" = field(default=None, init=False, repr=False)
    _store_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _store_retry_at: float = field(default=0.0, init=False, repr=False)
    _recorder: "BackgroundRecorder | None" = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.concurrency = model_concurrency(self.settings)
        self.gate = Gatekeeper(self.settings, self.auth)
        self.ops = Operations(self.settings, store_check=lambda: self.open_store().ping())
        self.ops.metrics.set_gauges("models", registry_gauges(self.registry))
        self.finetune = JobControl(self.settings, self.registry, lambda: self.store)
        self.defaults = ModelDefaults(self.settings, self.registry, lambda: self.store)
        self.sync = HubSync(self.settings, lambda: self.store, self.hub_api) if self.settings.sync_repo else None
        if self.sync is not None:
            self.ops.add_check(self.sync.readiness)

    @classmethod
    def build(cls, settings: Settings, registry: ModelRegistry | None = None, auth: AuthFile | None = None, *,
              hub_api: Any = None) -> "App":
        """The app for ``settings``: the environment set (before gradio or the model libraries are imported),
        a new registry unless one is given, the login file's users unless ``auth`` is given. Loads no model
        and opens no store. ``hub_api``: what the store's Hub sync (``settings.sync_repo``) talks to
        (default: an ``HfApi``)."""
        apply_environment(settings)
        if auth is None and settings.auth_file is not None:
            auth = AuthFile.load(settings.auth_file)
        return cls(settings, registry or open_registry(settings), auth, hub_api)

    @classmethod
    def create(cls, settings: Settings, registry: ModelRegistry | None = None,
               auth: AuthFile | None = None) -> "App":
        """The app over ``registry`` (default: a new one) and ``auth`` as given (no login file read)."""
        return cls(settings, registry or open_registry(settings), auth)

    def close(self, timeout: float = 5.0) -> None:
        """At shutdown: stop following fine-tuning jobs (they go on), record what was answered (waiting up to
        ``timeout`` seconds), sync the store to the Hub (when ``settings.sync_repo`` is set), close the store."""
        self.finetune.close()
        self.defaults.close()
        self.recorder.flush(timeout=timeout)
        self.recorder.close()
        if self.sync is not None:
            self.sync.stop()
            self.sync.sync_now()
        self.close_store()

    # -- who may do what --

    def role_of(self, request: Any) -> str | None:
        """The caller's role (``request``: gradio's, or anything with ``username`` and the visitor's cookie):
        with a login file, the user's; without one, admin for a browser or client holding the admin cookie
        (from the admin link printed at start-up), else none. The peer address never counts."""
        username = getattr(request, "username", None)
        if self.gate.is_admin(username, visitor_of(request)):
            return "admin"
        return self.auth.role_of(username) if self.auth is not None else None

    def require_admin(self, request: Any, action: str = "load or unload models") -> None:
        """Raise :class:`~mmdemo.errors.NotAllowedError` unless the caller is an admin; ``action`` names what
        was refused."""
        if self.role_of(request) == "admin":
            return
        if self.auth is None:
            raise NotAllowedError(f"Only admins can {action}. This app has no login: open the admin link mmdemo "
                                  "printed when it started (.../admin-login?token=...) in this browser, or start "
                                  "it with an auth file (MMDEMO_AUTH_FILE) and sign in as an admin.")
        name = getattr(request, "username", None) or "not signed in"
        raise NotAllowedError(f"Only admins can {action} ({name} is not an admin).")

    def annotator_of(self, request: Any) -> str | None:
        """Who is asking: the login name, else the anonymous id of the visitor's signed cookie (set by the
        server's request guard; a client without the cookie is a new visitor each time, so nobody can
        choose another person's id). None when the request carries neither."""
        from .feedback import anonymous_annotator

        visitor = visitor_of(request)
        return getattr(request, "username", None) or (anonymous_annotator(visitor.anonymous_id) if visitor else None)

    def audit(self, request: Any, action: str, target: str | None = None,
              details: dict[str, Any] | None = None) -> bool:
        """Record an action done outside the store (a preload, an unload) in the audit log, by the caller of
        ``request`` (:meth:`annotator_of`); False, logged as an error, when the entry could not be written."""
        from .feedback.audit import record_after

        return record_after(lambda: self.store, self.annotator_of(request), action, target, details)

    # -- feedback --

    @property
    def store(self) -> "FeedbackStore":
        """The feedback store, opened on first use (its migrations run then).

        Raises :class:`~mmdemo.feedback.StoreError` when it cannot be opened; the next attempt is made
        after ``STORE_RETRY_SECONDS``, so that an unreachable database does not slow every request.
        """
        if self._store is not None:
            return self._store
        from .feedback import StoreError

        if time.monotonic() < self._store_retry_at:
            raise StoreError("The feedback store is unavailable; see the server log.")
        try:
            return self.open_store()
        except Exception as exc:
            self._store_retry_at = time.monotonic() + STORE_RETRY_SECONDS
            if isinstance(exc, StoreError):  # its message says what is wrong and how to recover
                log.error("opening the feedback store failed: %s", exc)
            else:
                log.exception("opening the feedback store failed")
            raise StoreError("The feedback store could not be opened; see the server log.") from None

    def open_store(self) -> "FeedbackStore":
        """The feedback store, opened now if it is not open yet. Raises the store's own error (naming the
        database, what is wrong with it and how to recover), which :attr:`store` keeps for the log."""
        from .feedback import FeedbackStore

        with self._store_lock:
            if self._store is None:
                self._store = FeedbackStore.from_settings(self.settings)
        return self._store

    def close_store(self) -> None:
        """Close the feedback store (at shutdown, after the recorder is flushed)."""
        with self._store_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    @property
    def recorder(self) -> "BackgroundRecorder":
        """Records results in the feedback store off the request's path (see :mod:`mmdemo.feedback.recorder`)."""
        if self._recorder is None:
            from .feedback.recorder import BackgroundRecorder

            with self._store_lock:
                if self._recorder is None:
                    self._recorder = BackgroundRecorder(lambda: self.store,
                                                        on_recorded=lambda: self.ops.metrics.recorded("output"))
        return self._recorder

    def recorder_for(self, request: Any) -> "Record":
        """What :func:`mmdemo.tasks.predict` records with for the caller of ``request`` (who asked; None
        when unknown): the result's ``output_id`` is issued at once and the write follows in the background.

        A failure to record is logged and never fails the prediction; feedback on that id then says that
        the result could not be recorded. The id is None when not even an id could be issued.
        """
        def record(prediction: "Prediction") -> str | None:
            try:
                self.store  # noqa: B018 - opened once (at start-up, in the background); unavailable: no id
                return self.recorder.record(prediction, session=self.annotator_of(request))
            except MMDemoError as exc:
                log.warning("a %s result was not recorded for feedback: %s", prediction.task, exc)
            except Exception:
                log.exception("recording a %s result for feedback failed", prediction.task)
            return None

        return record

    # -- files the app writes --

    def output_dir(self) -> Path:
        """The folder of files the app hands out (generated images, exports); entries older than an hour
        are removed first."""
        if self._output_dir is None:
            self._output_dir = Path(tempfile.mkdtemp(prefix="mmdemo-outputs-"))
        cutoff = time.time() - OUTPUT_RETENTION_SECONDS
        for old in self._output_dir.iterdir():
            try:
                if old.stat().st_mtime >= cutoff:
                    continue
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
            except FileNotFoundError:  # removed by a concurrent call
                pass
        return self._output_dir

    def output_path(self, stem: str, suffix: str = ".png") -> Path:
        """A new file path for generated output in :meth:`output_dir`."""
        return self.output_dir() / f"{stem}-{os.urandom(4).hex()}{suffix}"
