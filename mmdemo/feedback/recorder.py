"""Recording results off the request's hot path.

Recording an output hashes its input media (the task's decode is reused), encodes a PNG and waits for an fsync:
tens of milliseconds for a photo, over a second for a new 12 MP one. The person waiting for a caption
need not wait for that. :class:`BackgroundRecorder` issues the ``output_id`` at once and records on a
writer thread; whoever then needs the output (a feedback save, a test) calls :meth:`wait` first.

* Back-pressure: when ``max_backlog`` results are already waiting, a call records in the caller's
  thread instead, so a burst never grows memory without bound.
* A failed record is logged; its id is remembered, so feedback on it gets a clear message.
* :meth:`flush` waits for everything pending (the app calls it when it closes; tests call it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable

from ..errors import MMDemoError
from .errors import StoreError
from .store import FeedbackStore, new_output_id

if TYPE_CHECKING:
    from ..tasks import Prediction

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 256  # results waiting to be written before calls record in their own thread
FAILED_IDS_KEPT = 4096  # how many failed output ids are remembered for a clear feedback message
WAIT_SECONDS = 30.0


class OutputNotRecordedError(StoreError):
    """The result was shown, but recording it failed, so it cannot be rated."""


class BackgroundRecorder:
    """Records task results in the feedback store from writer threads.

    ``store``: a callable returning the store (opened lazily by the app). ``workers``: writer threads;
    two let one encode media while the other waits for the disk. ``on_recorded()`` is called after each
    result is written (the app counts them).
    """

    def __init__(self, store: Callable[[], FeedbackStore], *, workers: int = 2,
                 max_backlog: int = DEFAULT_MAX_BACKLOG, on_recorded: Callable[[], None] = lambda: None):
        self._store = store
        self._on_recorded = on_recorded
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmdemo-record")
        self._max_backlog = max_backlog
        self._pending: dict[str, Future] = {}
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, prediction: "Prediction", session: str | None = None) -> str:
        """Issue the prediction's ``output_id`` and record it (in the background unless the backlog is full)."""
        output_id = new_output_id()
        # The caller may change the result once this returns (the UI replaces images by file names).
        snapshot = {key: list(value) if isinstance(value, list) else value for key, value in prediction.result.items()}
        prediction = dataclasses.replace(prediction, result=snapshot)
        with self._lock:
            background = len(self._pending) < self._max_backlog
            if background:
                future = self._executor.submit(self._write, prediction, session, output_id)
                self._pending[output_id] = future
        if background:
            future.add_done_callback(lambda _: self._forget(output_id))
        else:
            self._write(prediction, session, output_id)
        return output_id

    def wait(self, output_id: Any, timeout: float = WAIT_SECONDS) -> None:
        """Return once ``output_id`` is recorded (at once when it is not pending).

        Raises :class:`OutputNotRecordedError` when recording it failed or did not end in ``timeout``.
        """
        with self._lock:
            future = self._pending.get(output_id) if isinstance(output_id, str) else None
        if future is not None:
            try:
                future.result(timeout)
            except FutureTimeout:
                raise OutputNotRecordedError("This result is still being recorded; please try again in a "
                                             "moment.") from None
            except Exception:  # noqa: BLE001 - logged by _write; the failed id is remembered below
                pass
        with self._lock:
            reason = self._failed.get(output_id) if isinstance(output_id, str) else None
        if reason is not None:
            raise OutputNotRecordedError(f"This result could not be recorded, so it cannot be rated ({reason}).")

    def flush(self, timeout: float = WAIT_SECONDS) -> None:
        """Wait until every result handed in so far is recorded (or failed)."""
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - logged by _write
                pass

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        """Record what is pending, then stop the writer threads."""
        self._executor.shutdown(wait=True)

    def _write(self, prediction: "Prediction", session: str | None, output_id: str) -> None:
        try:
            self._store().record_prediction(prediction, session=session, output_id=output_id)
            self._on_recorded()
        except MMDemoError as exc:
            log.warning("a %s result was not recorded for feedback: %s", prediction.task, exc)
            self._remember_failure(output_id, str(exc))
            raise
        except Exception as exc:
            log.exception("recording a %s result for feedback failed", prediction.task)
            self._remember_failure(output_id, "see the server log")
            raise exc

    def _remember_failure(self, output_id: str, reason: str) -> None:
        with self._lock:
            self._failed[output_id] = reason
            while len(self._failed) > FAILED_IDS_KEPT:
                self._failed.popitem(last=False)

    def _forget(self, output_id: str) -> None:
        with self._lock:
            self._pending.pop(output_id, None)
