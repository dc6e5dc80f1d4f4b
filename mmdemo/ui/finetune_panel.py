"""Fine-tune section of the Models tab (admins): a catalog model trained on people's feedback, from the app.

An admin picks the task (those a fine-tuning adapter trains), the base model (catalog models of that task
and of a kind the adapter trains), a name for the new model and the training settings, sees how much
feedback there is to learn from, and starts the job. It runs in a background thread of the server, never
in the model queue, and one at a time per app (:class:`FinetuneSlot`, held by the app context); the panel
polls it with a ``gr.Timer`` for the stage, epoch, step and losses, and can cancel it. A job that succeeds
has put its model in the registry's catalog: the tabs' model dropdowns offer it after a page reload.
The job itself, and everything it checks, is :mod:`mmdemo.finetune` (imported on first use: start-up time).

API (admins; each returns the job's status as a dict): ``/finetune_start`` (task, base, name, epochs, lr,
batch_size, val_fraction, only), ``/finetune_status`` and ``/finetune_cancel``.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..errors import MMDemoError
from .common import AppContext, answered_in, json_safe, readable_errors, standalone
from .models_panel import EXPORT_ONLY

if TYPE_CHECKING:
    from ..finetune import FinetuneConfig, FinetuneJob

log = logging.getLogger(__name__)

TITLE = "Fine-tune"
START_QUEUE = "finetune"  # starting a job (quick checks); the training runs in a thread of its own
POLL_SECONDS = 1.0
# The form's defaults: FinetuneConfig's, and the store export's (only, val_fraction) as `mmdemo finetune` has them.
DEFAULTS = dict(epochs=3, lr=5e-5, batch_size=8, val_fraction=0.1, only="approved")
DESCRIPTION = (
    "Train a catalog model on the feedback people gave (their corrections, and results they approved) and "
    "add it to the catalog under a new name. The job runs in the background on this server, one at a time, "
    "and the app keeps answering meanwhile. It loads its own training copy of the base model (float32 "
    "weights, beside any copy the registry serves), so the device needs that much free memory. When it is "
    "done, reload the page to pick the new model in the tabs. Scripts: `/finetune_start`, `/finetune_status`, "
    "`/finetune_cancel` (admins)."
)
DONE = ("succeeded", "failed", "cancelled")


# --- the app's one job ----------------------------------------------------------------------------------


class FinetuneSlot:
    """The app's fine-tuning job: at most one runs at a time, in a background thread; the last one stays
    here (its progress, result or error) until the next starts."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.job: FinetuneJob | None = None
        self.started_by: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config: "FinetuneConfig", started_by: str | None) -> None:
        """Check what the job would refuse at once (see :func:`check_ready`), then run it in a thread.
        Refused with a readable ``gr.Error`` while another job runs."""
        from ..finetune import FinetuneJob

        with self._lock:
            if self.running:
                assert self.job is not None
                raise gr.Error(f"A fine-tuning job is running ('{self.job.config.name}' from "
                               f"'{self.job.config.base}'): wait for it to finish, or cancel it, then start again.",
                               title="A job is running", print_exception=False)
            check_ready(self.ctx, config)
            job = FinetuneJob(config, self.ctx.settings, store=self.ctx.store, registry=self.ctx.registry)
            self.job, self.started_by, self.started_at, self.finished_at = job, started_by, time.time(), None
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"finetune-{config.name}",
                                            daemon=True)
            self._thread.start()

    def _run(self, job: "FinetuneJob") -> None:
        try:
            job.run()
        except MMDemoError:
            pass  # typed and readable: in job.status and job.error, which the panel shows
        except Exception as exc:  # noqa: BLE001 - a bug or a system failure: the log has the traceback
            log.exception("fine-tuning %s failed", job.config.name)
            job.error = f"{type(exc).__name__}: {exc} (the server log has the details)"
        finally:
            self.finished_at = time.time()

    def cancel(self) -> bool:
        """Ask the running job to stop (at its next step; it publishes nothing). False when none runs."""
        if not self.running or self.job is None:
            return False
        self.job.cancel()
        return True

    def status(self) -> dict[str, Any]:
        """The job as plain JSON: state, what it trains, progress, then the result or the error."""
        job = self.job
        if job is None:
            return {"state": "idle", "message": "No fine-tuning job has run since the app started."}
        config, progress = job.config, job.progress
        state = job.status.value  # pending, running, succeeded, failed, cancelled
        end = self.finished_at if state in DONE and self.finished_at else time.time()
        info: dict[str, Any] = {
            "state": state, "job_id": job.id, "task": config.task, "base": config.base, "name": config.name,
            "started_by": self.started_by,
            "started_at": datetime.fromtimestamp(self.started_at or 0, timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(end - (self.started_at or end), 1), "cancel_requested": job.cancel_requested,
            "settings": {"epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size,
                         "val_fraction": config.val_fraction, "only": config.only},
            "stage": progress.stage, "epoch": progress.epoch, "epochs": progress.epochs or config.epochs,
            "step": progress.step, "total_steps": progress.total_steps, "train_loss": progress.train_loss,
            "val_loss": progress.val_loss, "error": job.error if state in ("failed", "cancelled") else None,
            "result": None,
        }
        if state == "succeeded" and job.result is not None:
            result = job.result
            # The job's last reports (saving, done) name no epoch or losses: those of its last epoch.
            last = result.metrics["epochs"][-1]
            info.update(epoch=last["epoch"], train_loss=last["train_loss"], val_loss=last["val_loss"])
            info["result"] = {"model": result.name, "saved_to": str(result.path),
                              "in_catalog": result.name in self.ctx.registry.catalog, "swapped": result.swapped,
                              "serve_error": result.serve_error, "summary": result.describe(),
                              "metrics": json_safe(result.metrics)}
        info["message"] = status_text(info)
        return json_safe(info)


def slot_of(ctx: AppContext) -> FinetuneSlot:
    """The fine-tuning slot of the app behind ``ctx`` (one per app context, made on first use)."""
    with _SLOT_LOCK:
        if ctx.finetune_slot is None:
            ctx.finetune_slot = FinetuneSlot(ctx)
        return ctx.finetune_slot


_SLOT_LOCK = threading.Lock()


# --- what the form offers and checks --------------------------------------------------------------------


def finetune_tasks() -> list[str]:
    """The tasks that can be fine-tuned (one adapter each in :mod:`mmdemo.finetune`)."""
    from ..finetune import finetune_adapters

    return list(finetune_adapters())


def base_models(ctx: AppContext, task: str | None) -> list[str]:
    """Catalog models of ``task`` whose kind its adapter trains (fine-tuned ones included)."""
    from ..finetune import finetune_adapters

    adapter = finetune_adapters().get(task or "")
    if adapter is None:
        return []
    return [spec.id for spec in ctx.registry.catalog if spec.task == task and spec.kind in adapter.kinds]


def check_ready(ctx: AppContext, config: "FinetuneConfig") -> int:
    """Refuse at once what the job would refuse after a while: a base that is unknown or of another task
    or kind, a name in use, no feedback to learn from. Returns how many feedback records match."""
    from ..finetune import InvalidDatasetError, adapter_for
    from ..finetune.jobs import check_new_model_name

    adapter_for(config.task).check_base(ctx.registry.catalog.get(config.base))
    check_new_model_name(ctx.registry.catalog, ctx.settings.models_dir, config.name, overwrite=config.overwrite)
    only = config.only or DEFAULTS["only"]
    available = ctx.store.count(config.task, only=only)
    if not available:
        raise InvalidDatasetError(
            f"There is no {only} feedback on {config.task} to train on yet: rate or correct some results first"
            + ("." if only == "all" else ", or choose all feedback."))
    return available


def available_text(ctx: AppContext, task: str | None, only: str | None) -> str:
    """How much feedback the run would learn from, said before it starts."""
    if not task:
        return ""
    only = only or DEFAULTS["only"]
    try:
        matching, total = ctx.store.count(task, only=only), ctx.store.count(task, only="all")
    except MMDemoError as exc:
        return f"*The feedback store is unavailable: {exc}*"
    if not matching:
        return (f"**No {only} feedback on {task} yet** ({total} feedback record(s) in all): rate or correct "
                "some results first.")
    return (f"**{matching} {only} feedback record(s)** on {task} to train on ({total} in all). Identical "
            "examples are merged; the validation fraction of the inputs is kept aside.")


def config_from(ctx: AppContext, task: str | None, base: str | None, name: str | None, epochs: Any, lr: Any,
                batch_size: Any, val_fraction: Any, only: str | None) -> "FinetuneConfig":
    """The run's configuration from the form's or the API's values (readable errors for bad ones)."""
    from ..finetune import FinetuneConfig, InvalidModelNameError, UnsupportedBaseError

    task = task or next(iter(finetune_tasks()))
    if not base:
        bases = base_models(ctx, task)
        if not bases:
            raise UnsupportedBaseError(f"No catalog model can be fine-tuned for {task}.")
        base = bases[0]
    if not name:
        raise InvalidModelNameError("Give the new model a name: letters, digits, '.', '_' or '-'.")
    return FinetuneConfig(task, base=base, name=name, epochs=_whole(epochs), lr=lr,
                          batch_size=_whole(batch_size), val_fraction=val_fraction, only=only or DEFAULTS["only"])


def _whole(value: Any) -> Any:
    """2.0 -> 2 (JSON and number boxes send floats); anything else as it is, for the config to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# --- what the panel shows -------------------------------------------------------------------------------


def status_text(info: dict[str, Any]) -> str:
    """The job's status in Markdown."""
    state = info["state"]
    if state == "idle":
        return info["message"]
    name, base = info["name"], info["base"]
    who = f", started by {info['started_by']}" if info.get("started_by") else ""
    if state in ("pending", "running"):
        lines = [f"**Fine-tuning `{name}`** from `{base}` ({info['task']}{who}, {info['seconds']:.0f} s so far)"]
        if info["cancel_requested"]:
            lines.append("*Cancelling: the job stops at its next step.*")
        lines.append(progress_line(info))
        return "  \n".join(lines)
    if state == "succeeded":
        result = info["result"] or {}
        lines = [f"✓ **`{name}` is ready** ({info['seconds']:.0f} s{who})."]
        if result.get("summary"):
            lines.append(result["summary"])
        if result.get("serve_error"):
            lines.append(f"*It could not be swapped in for the loaded model: {result['serve_error']}*")
        lines.append(f"Reload the page to choose `{name}` in the {info['task']} tab's model list.")
        return "  \n".join(lines)
    if state == "cancelled":
        return (f"**Fine-tuning `{name}` was cancelled** at step {info['step']}/{info['total_steps']}; "
                "nothing was published.")
    return f"**Fine-tuning `{name}` failed:** {info['error']}"


def progress_line(info: dict[str, Any]) -> str:
    stage = info["stage"]
    if stage in ("pending", "preparing"):
        return "Stage: **preparing** (exporting the feedback, loading the base model)"
    parts = [f"Stage: **{stage}**"]
    if info["epoch"]:  # the saving stage names no epoch
        parts.append(f"epoch {info['epoch']}/{info['epochs']}")
    if info["total_steps"]:
        parts.append(f"step {info['step']}/{info['total_steps']} ({info['step'] / info['total_steps']:.0%})")
    parts.append(f"train loss {_loss(info['train_loss'])}")
    parts.append(f"validation loss {_loss(info['val_loss'])}")
    return " · ".join(parts)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def access_text(ctx: AppContext, request: gr.Request | None) -> str:
    if ctx.role_of(request) == "admin":
        return ""
    if ctx.auth is None:
        return ("**Fine-tuning is switched off:** no login is configured and the app is reachable from other "
                "machines. Set MMDEMO_AUTH_FILE and sign in as an admin.")
    name = getattr(request, "username", None) or "not signed in"
    return (f"**Fine-tuning is for admins.** You ({name}) can see this form, but only an admin can start or "
            "cancel a job.")


# --- the section ----------------------------------------------------------------------------------------


def build(ctx: AppContext) -> SimpleNamespace:
    """The Fine-tune section (inside the Models tab) and its API endpoints."""
    slot = slot_of(ctx)

    def start_job(task: str | None, base: str | None, name: str | None, epochs: Any, lr: Any, batch_size: Any,
                  val_fraction: Any, only: str | None, request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "fine-tune models")
        config = config_from(ctx, task, base, name, epochs, lr, batch_size, val_fraction, only)
        slot.start(config, ctx.annotator_of(request))
        return slot.status()

    def job_status(request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "follow fine-tuning jobs")
        return slot.status()

    def cancel_job(request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "cancel fine-tuning jobs")
        if not slot.cancel():
            raise gr.Error("No fine-tuning job is running.", title="Nothing to cancel", print_exception=False)
        return slot.status()

    # -- the API --

    def finetune_start(task: str = "", base: str = "", name: str = "", epochs: int = DEFAULTS["epochs"],
                       lr: float = DEFAULTS["lr"], batch_size: int = DEFAULTS["batch_size"],
                       val_fraction: float = DEFAULTS["val_fraction"], only: str = DEFAULTS["only"],
                       request: gr.Request = None) -> dict[str, Any]:
        """Start fine-tuning (admins): train `base` (a catalog model of `task`; default: the first the task
        can train) on the store's feedback (`only`: approved, corrected or all) into a new catalog model
        `name`. task: default the first that can be fine-tuned (image-to-text). Returns the job's status
        at once; the job runs in the background: follow it with /finetune_status. One job at a time."""
        return start_job(task, base, name, epochs, lr, batch_size, val_fraction, only, request)

    def finetune_status(request: gr.Request = None) -> dict[str, Any]:
        """The fine-tuning job's status (admins): state (idle, pending, running, succeeded, failed,
        cancelled), stage, epoch/epochs, step/total_steps, train_loss, val_loss, error, and when it
        succeeded the result (model, path, metrics, summary)."""
        return job_status(request)

    def finetune_cancel(request: gr.Request = None) -> dict[str, Any]:
        """Cancel the running fine-tuning job (admins); it stops at its next step and publishes nothing."""
        return cancel_job(request)

    gr.api(readable_errors(finetune_start), api_name="finetune_start", concurrency_id=START_QUEUE,
           concurrency_limit=1)
    gr.api(readable_errors(finetune_status), api_name="finetune_status", queue=False)
    gr.api(readable_errors(finetune_cancel), api_name="finetune_cancel", queue=False)

    # -- the form --

    gr.Markdown(DESCRIPTION, elem_classes="mmdemo-note")
    access = gr.Markdown(elem_classes="mmdemo-finetune-access")
    with gr.Row():
        task = gr.Dropdown([], value=None, label="Task", scale=2)
        base = gr.Dropdown([], value=None, label="Base model", scale=2)
        name = gr.Textbox("", label="New model name", placeholder="blip-ours", scale=2,
                          info="Letters, digits, '.', '_' or '-'; a name no model has.")
    with gr.Row():
        epochs = gr.Number(DEFAULTS["epochs"], label="Epochs", precision=0, minimum=1, maximum=10_000)
        lr = gr.Number(DEFAULTS["lr"], label="Learning rate", minimum=0, step=1e-5)
        batch_size = gr.Number(DEFAULTS["batch_size"], label="Batch size", precision=0, minimum=1, maximum=4096)
        val_fraction = gr.Number(DEFAULTS["val_fraction"], label="Validation fraction", minimum=0, maximum=0.99,
                                 step=0.05)
        only = gr.Dropdown(EXPORT_ONLY, value=DEFAULTS["only"], label="Feedback to train on")
    available = gr.Markdown(elem_classes="mmdemo-finetune-available")
    with gr.Row():
        start = gr.Button("Start fine-tuning", variant="primary")
        cancel = gr.Button("Cancel", variant="stop")
    answer = gr.Markdown(elem_classes="mmdemo-finetune-answer")  # what became of the last click
    status = gr.Markdown(elem_classes="mmdemo-finetune-status")
    with gr.Accordion("Job status (JSON)", open=False):
        details = gr.JSON(label="Job status", show_label=False)
    timer = gr.Timer(POLL_SECONDS, active=False)

    def shown(info: dict[str, Any]) -> tuple[str, dict[str, Any], gr.Timer]:
        """The status line, the JSON, and the timer: polling while the job runs."""
        return info["message"], info, gr.Timer(active=info["state"] not in DONE + ("idle",))

    @readable_errors
    def page_load(request: gr.Request) -> tuple[Any, ...]:
        admin = ctx.role_of(request) == "admin"
        tasks = finetune_tasks()
        first = tasks[0] if tasks else None
        bases = base_models(ctx, first)
        info = slot.status() if admin else {"state": "idle", "message": ""}
        return (access_text(ctx, request), gr.Dropdown(choices=tasks, value=first),
                gr.Dropdown(choices=bases, value=bases[0] if bases else None),
                available_text(ctx, first, DEFAULTS["only"]) if admin else "", *shown(info),
                gr.Button(interactive=admin), gr.Button(interactive=admin))

    @readable_errors
    def task_chosen(task_id: str | None, only_value: str | None, request: gr.Request) -> tuple[Any, str]:
        bases = base_models(ctx, task_id)
        admin = ctx.role_of(request) == "admin"
        return (gr.Dropdown(choices=bases, value=bases[0] if bases else None),
                available_text(ctx, task_id, only_value) if admin else "")

    @readable_errors
    def only_chosen(task_id: str | None, only_value: str | None, request: gr.Request) -> str:
        return available_text(ctx, task_id, only_value) if ctx.role_of(request) == "admin" else ""

    @answered_in(answer, "Not started")
    def start_clicked(task_id: str | None, base_id: str | None, new_name: str | None, n_epochs: Any, rate: Any,
                      size: Any, fraction: Any, only_value: str | None, request: gr.Request) -> tuple[Any, ...]:
        info = start_job(task_id, base_id, new_name, n_epochs, rate, size, fraction, only_value, request)
        return "✓ Started: its progress follows below.", *shown(info)

    @answered_in(answer, "Not cancelled")
    def cancel_clicked(request: gr.Request) -> tuple[Any, ...]:
        info = cancel_job(request)
        return "Cancelling: the job stops at its next step and publishes nothing.", *shown(info)

    @readable_errors
    def poll(task_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        info = job_status(request)
        # When a job has just ended, its model may be a base too: offer it (the value stays as chosen).
        refreshed = gr.Dropdown(choices=base_models(ctx, task_id)) if info["state"] in DONE else gr.skip()
        return *shown(info), refreshed

    quick = dict(queue=False, show_progress="hidden", api_visibility="private")
    # On page load only (no triggers, no inputs): the tasks, bases and counts of today, the job if any.
    gr.on(None, page_load, None, [access, task, base, available, status, details, timer, start, cancel], **quick)
    task.input(task_chosen, [task, only], [base, available], **quick)
    only.input(only_chosen, [task, only], [available], **quick)
    # A refusal is said under the buttons (answer); the job's status stays as it was. Unprocessed: the run's
    # configuration judges the numbers (as for /finetune_start), not gradio's number boxes in a toast.
    start.click(start_clicked, [task, base, name, epochs, lr, batch_size, val_fraction, only],
                [answer, status, details, timer], concurrency_id=START_QUEUE, concurrency_limit=1,
                show_progress="hidden", preprocess=False, api_visibility="private")
    cancel.click(cancel_clicked, None, [answer, status, details, timer], queue=False, show_progress="hidden",
                 api_visibility="private")
    timer.tick(poll, [task], [status, details, timer, base], **quick)
    return SimpleNamespace(slot=slot, task=task, base=base, name=name, epochs=epochs, lr=lr, batch_size=batch_size,
                           val_fraction=val_fraction, only=only, available=available, start=start, cancel=cancel,
                           answer=answer, status=status, details=details, timer=timer, access=access)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
