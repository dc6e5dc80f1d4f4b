"""Fine-tuning jobs as processes: the server queues them in the store and starts each as an
``mmdemo finetune --job-id ID`` process of its own (never a fork of the threaded server), one per device.

>>> runner = JobRunner(settings, store, registry)        # the app's; a thread starts and watches the queue
>>> job = runner.submit(config, started_by="alice")       # pending; started when its device is free
>>> runner.status(job.id)["place"]                        # its place in the queue while it waits
>>> runner.cancel(job.id)                                 # pending: dropped; running: SIGTERM
>>> runner.resume(job.id, started_by="alice")             # failed: a new job continues from its last checkpoint

The job's process writes its own progress and end into the store (:func:`mmdemo.finetune.jobs.run_stored_job`);
the runner starts waiting jobs, notices a process that died without saying so (its exit status and the
last lines of its log), and puts each new model in the registry's catalog. A restarted app, or another
replica, finds running jobs in the store and follows them. This module imports no training code.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..catalog import MODEL_ENTRY_FILE, Catalog, read_model_folders
from ..config import Settings
from ..errors import MMDemoError
from ..feedback.finetune_jobs import (
    ACTIVE,
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    FinetuneJobStore,
    JobRecord,
)
from .config import FinetuneConfig, check_model_name
from .errors import FinetuneError, InvalidModelNameError

if TYPE_CHECKING:
    from ..catalog import ModelSpec
    from ..registry import ModelRegistry

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
LOG_TAIL_LINES = 15
JOB_LOGS = ".jobs"        # <models_dir>/.jobs/<job id>.log while a job runs; copied into its model folder
MODEL_LOG_FILE = "finetune.log"
STARTING_GRACE_SECONDS = 60.0  # a running row without a pid yet: its starter is between claim and spawn
RESUME_STATE_FILE = "state.pt"  # in a run's resumable checkpoint folder (resume_folder), beside best/
RESUMES = "resumes"             # in a job record's config: the failed job it continues (`--resume`)


class JobRunner:
    """The app's fine-tuning queue (see the module's docstring). ``start=False``: no watching thread
    (call :meth:`tick` yourself)."""

    def __init__(self, settings: Settings, store: Any, registry: "ModelRegistry", *, start: bool = True,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.settings = settings
        self.jobs = FinetuneJobStore(store)
        self.registry = registry
        self.host = socket.gethostname()
        self._children: dict[str, subprocess.Popen] = {}      # the processes this runner started
        self._cancelling: set[str] = set()
        self._served: dict[str, dict[str, Any]] = {}          # job id -> swapped, serve_error
        self._lock = threading.RLock()
        self._stop = threading.Event()
        # Models that jobs published before the registry read the models folder are in its catalog already.
        self._served.update({job.id: {"swapped": False, "serve_error": None}
                             for job in self.jobs.list(states=(SUCCEEDED,)) if job.name in registry.catalog})
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._watch, args=(poll_seconds,), name="finetune-jobs",
                                            daemon=True)
            self._thread.start()

    # -- control --

    def submit(self, config: FinetuneConfig, started_by: str | None) -> JobRecord:
        """Queue a job for ``config`` (checked by the caller) and start it if its device is free."""
        with self._lock:
            if any(job.name == config.name for job in self.jobs.list(states=ACTIVE)):
                raise InvalidModelNameError(f"A job is already fine-tuning '{config.name}'; choose another name.")
            device = self.registry.placement_for(self.registry.catalog.get(config.base)).device
            job = self.jobs.create(config.name, config.task, config.base, device, config.to_dict(),
                                   created_by=started_by)
            self.tick()
            return self.jobs.get(job.id)

    def cancel(self, job_id: str | None = None) -> JobRecord:
        """Cancel ``job_id`` (default: the newest job still waiting or running): a waiting job leaves the
        queue; a running one gets SIGTERM, stops at its next step and publishes nothing."""
        with self._lock:
            job = self._active(job_id)
            if job.state == PENDING and self.jobs.finish(job.id, CANCELLED, error="Cancelled before it started."):
                return self.jobs.get(job.id)
            job = self.jobs.get(job.id)
            if job.state == RUNNING:
                self._cancelling.add(job.id)
                if job.pid and job.host == self.host:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(job.pid, signal.SIGTERM)
            return job

    def resume(self, job_id: str | None, started_by: str | None) -> JobRecord:
        """Queue a job that continues the failed job ``job_id`` (default: the newest job) from the last
        checkpoint it left, with its settings (``mmdemo finetune --resume``); refused for any other job."""
        with self._lock:
            job = self.jobs.get(job_id) if job_id else self.jobs.latest()
            if job is None:
                raise FinetuneError("No fine-tuning job has run yet.")
            if not self.resumable(job):
                raise FinetuneError(f"The job training '{job.name}' cannot be resumed: only a failed job that left "
                                    f"a checkpoint can (this one {'left none' if job.state == FAILED else job.state}).")
            if any(other.name == job.name for other in self.jobs.list(states=ACTIVE)):
                raise InvalidModelNameError(f"A job is already fine-tuning '{job.name}'.")
            config = {key: value for key, value in job.config.items() if key != RESUMES}
            resumed = self.jobs.create(job.name, job.task, job.base, job.device, {**config, RESUMES: job.id},
                                       created_by=started_by)
            self.tick()
            return self.jobs.get(resumed.id)

    def resumable(self, job: JobRecord) -> bool:
        """A failed job whose run left a checkpoint to continue from."""
        return job.state == FAILED and (resume_folder(self.settings.models_dir, job.name) / RESUME_STATE_FILE).is_file()

    def cancel_requested(self, job: JobRecord) -> bool:
        return job.id in self._cancelling

    def close(self) -> None:
        """Stop watching (the job processes go on; a new runner on the same store follows them)."""
        self._stop.set()

    # -- what the panel and the API show --

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        """The job ``job_id`` (default: the newest) as plain JSON, with the queue; ``{"state": "idle"}``
        when there is none."""
        with self._lock:
            self.tick()
            job = self.jobs.get(job_id) if job_id else self.jobs.latest()
            if job is None:
                return {"state": "idle", "message": "No fine-tuning job has run yet.", "queue": []}
            active = self.jobs.list(states=ACTIVE)
            info = self._describe(job, active)
            info["queue"] = [{key: value for key, value in self._describe(other, active).items()
                              if key in ("job_id", "name", "state", "place", "device", "eta_seconds")}
                             for other in active]
            return info

    def _describe(self, job: JobRecord, active: list[JobRecord]) -> dict[str, Any]:
        config, progress = job.config, dict(job.progress or {})
        end = job.finished_at or datetime.now(timezone.utc)
        started = job.started_at or job.created_at
        waiting = [other for other in active if other.state == PENDING and other.device == job.device]
        info: dict[str, Any] = {
            "state": job.state, "job_id": job.id, "task": job.task, "base": job.base, "name": job.name,
            "device": job.device, "started_by": job.created_by,
            "created_at": job.created_at.isoformat(timespec="seconds"),
            "started_at": job.started_at.isoformat(timespec="seconds") if job.started_at else None,
            "seconds": round((end - started).total_seconds(), 1) if job.state != PENDING else 0.0,
            "cancel_requested": self.cancel_requested(job),
            "settings": {key: config.get(key) for key in ("epochs", "lr", "batch_size", "val_fraction", "only",
                                                              "lora", "merge")},
            "stage": progress.get("stage", "queued"), "epoch": progress.get("epoch", 0),
            "epochs": progress.get("epochs") or config.get("epochs"), "step": progress.get("step", 0),
            "total_steps": progress.get("total_steps", 0), "train_loss": progress.get("train_loss"),
            "val_loss": progress.get("val_loss"), "eta_seconds": progress.get("eta_seconds"),
            "process": progress.get("process"),
            "place": 1 + [other.id for other in waiting].index(job.id) if job.state == PENDING else None,
            "pid": job.pid, "exit_code": job.exit_code, "log_path": job.log_path,
            "error": job.error if job.state in (FAILED, CANCELLED) else None, "result": None, "log_tail": None,
            "resumable": self.resumable(job), "resumes": config.get(RESUMES),
        }
        if job.state == PENDING:  # the running job on its device finishes first
            ahead = [other for other in active if other.state == RUNNING and other.device == job.device]
            info["eta_seconds"] = ahead[0].progress.get("eta_seconds") if ahead and ahead[0].progress else None
        if job.state == FAILED:
            info["log_tail"] = log_tail(job.log_path)
        if job.state == SUCCEEDED and job.result:
            served = self._served.get(job.id, {})
            info["result"] = {**{key: job.result.get(key) for key in ("model", "saved_to", "summary", "metrics")},
                              "in_catalog": job.name in self.registry.catalog,
                              "swapped": served.get("swapped", False), "serve_error": served.get("serve_error")}
        return info

    def _active(self, job_id: str | None) -> JobRecord:
        if job_id:
            job = self.jobs.get(job_id)
            if job.active:
                return job
            raise FinetuneError(f"The fine-tuning job '{job.name}' has already ended ({job.state}).")
        active = self.jobs.list(states=ACTIVE)
        if not active:
            raise FinetuneError("No fine-tuning job is running.")
        return active[-1]

    # -- the queue --

    def tick(self) -> None:
        """One round: note processes that died, publish new models, start waiting jobs on free devices."""
        with self._lock:
            active = self.jobs.list(states=ACTIVE)
            for job in active:
                if job.state == RUNNING:
                    self._check_process(job)
            self._reap_finished_children()
            self._publish_new_models()
            busy = {job.device for job in self.jobs.list(states=(RUNNING,))}
            for job in self.jobs.list(states=(PENDING,)):
                if job.device not in busy:
                    busy.add(job.device)
                    self._spawn(job)

    def _spawn(self, job: JobRecord) -> None:
        logs = Path(self.settings.models_dir) / JOB_LOGS
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{job.id}.log"
        if not self.jobs.claim(job.id, pid=None, host=self.host, log_path=str(log_path)):
            return  # another replica started it
        command = [sys.executable, "-m", "mmdemo", "finetune", "--job-id", job.id, *settings_arguments(self.settings)]
        try:
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            self.jobs.finish(job.id, FAILED, error=f"The job's process could not start: {exc}")
            return
        self._children[job.id] = process
        self.jobs.set_pid(job.id, process.pid)
        log.info("fine-tuning job %s (%s) started as process %d", job.id, job.name, process.pid)

    def _check_process(self, job: JobRecord) -> None:
        """A running job whose process is gone without writing its end: failed (or cancelled), and why."""
        child = self._children.get(job.id)
        if child is not None:
            code = child.poll()
            if code is None:
                return
        elif job.host != self.host:
            return  # another machine's job: its replica watches it
        elif job.pid is None:
            started = job.started_at or job.created_at
            if (datetime.now(timezone.utc) - started).total_seconds() < STARTING_GRACE_SECONDS:
                return
            code = None
        elif process_alive(job.pid, job.id):
            return
        else:
            code = None
        job = self.jobs.get(job.id)  # it may have written its end just before exiting
        if job.state != RUNNING:
            return
        if job.id in self._cancelling and code in (None, 0, 1, -signal.SIGTERM):
            self.jobs.finish(job.id, CANCELLED, exit_code=code, error="The job was cancelled; nothing was published.")
        else:
            self.jobs.finish(job.id, FAILED, exit_code=code, error=died_message(code))
        remove_stale_staging(Path(self.settings.models_dir))  # a half-written model is never served
        self._children.pop(job.id, None)

    def _reap_finished_children(self) -> None:
        for job_id, child in list(self._children.items()):
            code = child.poll()
            if code is not None:
                self.jobs.set_exit_code(job_id, code)
                del self._children[job_id]

    def _publish_new_models(self) -> None:
        for job in self.jobs.list(states=(SUCCEEDED,)):
            if job.id in self._served:
                continue
            specs = [spec for spec in read_model_folders(Path(self.settings.models_dir)) if spec.id == job.name]
            self._served[job.id] = (serve_published(self.registry, specs[0]) if specs else
                                    {"swapped": False, "serve_error": "its model folder is missing"})

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.tick()
            except MMDemoError as exc:  # the store is unreachable for a moment: try again next round
                log.warning("fine-tuning queue: %s", exc)
            except Exception:  # noqa: BLE001 - keep watching; the log has the traceback
                log.exception("fine-tuning queue")


def serve_published(registry: "ModelRegistry", spec: "ModelSpec") -> dict[str, Any]:
    """Tell a running registry about a newly published model: hot-swap it in if a model of that name is
    loaded, and (re)register it. A failed swap leaves the old model serving; says which happened."""
    if spec.id in registry.catalog and registry.is_loaded(spec.id):
        if registry.catalog.get(spec.id).adapter_of != spec.adapter_of:
            # a LoRA adapter replacing a full checkpoint (or the reverse) loads differently: no hot swap, the
            # next call loads the new one
            registry.catalog.register(spec, override=True)
            registry.unload(spec.id)
            return {"swapped": False, "serve_error": None}
        try:
            registry.replace(spec.id, spec.source)
        except MMDemoError as exc:
            log.warning("the new %s is saved but could not be swapped in: %s", spec.id, exc)
            return {"swapped": False, "serve_error": str(exc)}
        registry.catalog.register(spec, override=True)
        return {"swapped": True, "serve_error": None}
    registry.catalog.register(spec, override=True)  # with its new size and description
    return {"swapped": False, "serve_error": None}


def settings_arguments(settings: Settings) -> list[str]:
    """The common ``mmdemo`` options that give a job's process the server's settings."""
    arguments = ["--profile", settings.profile, "--data-dir", str(settings.data_dir), "--device", settings.device,
                 "--dtype", settings.dtype, "--memory-budget", str(settings.memory_budget)]
    if settings.catalog is not None:
        arguments += ["--catalog", str(settings.catalog)]
    if settings.database_url:
        arguments += ["--database-url", settings.database_url]
    return arguments


def died_message(code: int | None) -> str:
    """Why a job's process ended without saying how: its exit status, or that it is gone."""
    if code is None:
        return "The job's process is gone (killed, out of memory or crashed; its exit status is unknown)."
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"The job's process died: killed by {name} (exit status {code})."
    return f"The job's process exited with status {code} before it finished."


def log_tail(path: str | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a job's log ([] when there is none)."""
    if not path:
        return []
    try:
        with open(path, "rb") as handle:
            return [line.decode("utf-8", "replace").rstrip() for line in deque(handle, maxlen=lines)]
    except OSError:
        return []


def process_alive(pid: int, job_id: str | None = None) -> bool:
    """Whether process ``pid`` exists and is not a zombie; with ``job_id``, also that it is that job's
    (its command line names it), so a reused pid is not mistaken for the job."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return state not in ("Z", "X") and (job_id is None or job_id.encode() in command)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


# --- the models folder ---------------------------------------------------------------------------


def model_folder(models_dir: Path, name: str) -> Path:
    """``models_dir/name``, after checking that ``name`` is safe and the folder stays inside."""
    check_model_name(name)
    folder = Path(models_dir) / name
    if folder.resolve().parent != Path(models_dir).resolve():
        raise InvalidModelNameError(f"The model name {name!r} leads outside {models_dir}.")
    return folder


@contextlib.contextmanager
def name_lock(models_dir: Path, name: str) -> Iterator[None]:
    """One job at a time per model name, across threads and processes (an flock on a hidden file)."""
    locks = Path(models_dir) / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidModelNameError(f"Another job is fine-tuning '{name}' right now.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resume_folder(models_dir: Path, name: str) -> Path:
    """``<models_dir>/.<name>.resume``: a run's resumable checkpoint, kept until the run publishes its model
    or is cancelled; hidden, so that the catalog never reads it."""
    return Path(models_dir) / f".{check_model_name(name)}.resume"


def check_new_model_name(catalog: Catalog, models_dir: Path, name: str, *, overwrite: bool) -> None:
    """A fine-tuned model may take a new id, or (with ``overwrite``) replace its own earlier self;
    never a built-in model or one from a catalog file, never a folder that is not a model of ours."""
    folder = model_folder(models_dir, name)
    if name in catalog and catalog.get(name).source != f"local-dir:{folder.resolve()}":
        raise InvalidModelNameError(f"'{name}' is already a catalog model; choose another name for the new one.")
    if folder.exists() or folder.is_symlink():
        if not overwrite:
            raise InvalidModelNameError(
                f"A fine-tuned model '{name}' already exists in {models_dir}; choose another name or overwrite it.")
        if folder.is_symlink() or not (folder / MODEL_ENTRY_FILE).is_file():
            raise InvalidModelNameError(f"{folder} exists and is not a fine-tuned model; it will not be replaced.")


def remove_stale_staging(models_dir: Path) -> list[Path]:
    """Delete staging folders of jobs that died (their process is gone) and leftovers of ``publish``."""
    removed = []
    for path in Path(models_dir).glob(".*.*-*"):
        kind, _, rest = path.name.rpartition(".")[2].partition("-")
        if kind == "partial":
            pid = rest.partition("-")[0]
            if pid.isdigit() and process_alive(int(pid)):
                continue
        elif kind != "old":
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


__all__ = ["JobRunner", "check_new_model_name", "died_message", "log_tail", "model_folder", "name_lock",
           "process_alive", "remove_stale_staging", "resume_folder", "serve_published", "settings_arguments"]
