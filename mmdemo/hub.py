"""Whether the Hugging Face Hub can be reached, and which Hub models are already in the local cache.

Without this, a machine that cannot reach the Hub waits minutes for huggingface_hub's retries (file
after file) before a model load fails. :class:`HubProbe` answers within a few seconds instead, remembers
the answer for a few minutes (then asks again: a network that comes back is noticed) and never switches
the process offline. :func:`cached_snapshot` finds a model already downloaded, which then loads from its
local folder while the Hub is out of reach.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 3.0  # the whole probe, name resolution included
PROBE_TTL_SECONDS = 300.0  # an answer is reused this long, then the Hub is asked again
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubState:
    reachable: bool
    reason: str  # why not, when not reachable ("" when it is)
    checked_at: float  # time.monotonic() of the probe


def offline_by_environment() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: the Hub libraries never go online."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The Hub endpoint huggingface_hub uses (``HF_ENDPOINT`` overrides it)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


class HubProbe:
    """Asks the Hub endpoint once per ``ttl`` seconds whether it answers; one probe at a time."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = PROBE_TIMEOUT_SECONDS,
                 ttl: float = PROBE_TTL_SECONDS) -> None:
        self._endpoint = endpoint
        self.timeout = timeout
        self.ttl = ttl
        self._state: HubState | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return self._endpoint or hub_endpoint()

    def last_known(self) -> HubState | None:
        """The latest answer, without asking again (None before the first probe)."""
        return self._state

    def state(self) -> HubState:
        """A fresh enough answer: the remembered one, or a new probe (at most ``timeout`` seconds)."""
        with self._lock:
            state = self._state
            if state is None or time.monotonic() - state.checked_at >= self.ttl:
                state = self._state = self._probe()
                if not state.reachable:
                    log.warning("the Hub cannot be reached: %s", state.reason)
            return state

    def check_in_background(self) -> threading.Thread:
        """Probe now in a thread, so that the Models panel knows the answer by the time a page asks."""
        thread = threading.Thread(target=self.state, name="mmdemo-hub-probe", daemon=True)
        thread.start()
        return thread

    def _probe(self) -> HubState:
        now = time.monotonic()
        if offline_by_environment():
            return HubState(False, "HF_HUB_OFFLINE is set", now)
        endpoint = self.endpoint.rstrip("/")
        # Name resolution ignores socket timeouts, so the whole request runs in a thread we stop waiting for.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmdemo-hub-probe")
        try:
            future = executor.submit(_ask, f"{endpoint}/api/models?limit=1", self.timeout)
            reason = future.result(timeout=self.timeout)
        except FutureTimeout:
            reason = f"{endpoint} did not answer within {self.timeout:g} s"
        finally:
            executor.shutdown(wait=False)
        return HubState(reason == "", reason, now)


def _ask(url: str, timeout: float) -> str:
    """"" when the endpoint answers with any HTTP status; otherwise why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return ""
    except urllib.error.HTTPError:
        return ""  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        detail = getattr(exc, "reason", exc)
        endpoint = url.split('/api/')[0]
        if isinstance(detail, TimeoutError):  # the socket's own timeout can end the wait first: the same silence
            return f"{endpoint} did not answer within {timeout:g} s"
        return f"{endpoint} cannot be reached ({detail})"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local folder of ``repo_id`` at ``revision`` (a branch, tag or commit, short or full) in
    huggingface_hub's cache, or None where it was never downloaded."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
    if revision:
        matches = sorted(p for p in snapshots.iterdir() if p.is_dir() and p.name.startswith(revision))
        if matches:
            return matches[0]
    return None
