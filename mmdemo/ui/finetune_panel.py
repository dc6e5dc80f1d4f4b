"""Fine-tune section of the Models tab (admins): a catalog model trained on people's feedback, from the app.

An admin picks the task (those a fine-tuning adapter trains), the base model (catalog models of that task
and of a kind the adapter trains), a name for the new model and the training settings, sees how much
feedback there is to learn from, and starts the job. A job is an ``mmdemo finetune`` process of its own,
queued in the feedback store (one runs per device, the others wait in order); the panel only calls the
app's job control (``ctx.finetune``, a :class:`~mmdemo.finetune.control.JobControl`, which never imports
the training code) and polls it with a ``gr.Timer`` for the place in the queue, stage, epoch, step, losses and
ETA, and can cancel it; a job that failed (its process killed, say) and left a checkpoint can be resumed,
as a new job that continues from it. A job that succeeds has put its model in the registry's catalog: the tabs' model
dropdowns offer it after a page reload; the panel then shows its before/after table and loss curve
(:func:`~mmdemo.finetune.evaluate.before_after`, :func:`~mmdemo.finetune.evaluate.loss_curve`). An app
restarted, or another replica, shows the same jobs.

API (admins; each returns a job's status as a dict): ``/finetune_start`` (task, base, name, epochs, lr,
batch_size, val_fraction, only, training: auto, full, lora or merged), ``/finetune_status``, ``/finetune_cancel``
and ``/finetune_resume`` (job_id, default the newest).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd

from ..errors import MMDemoError
from ..finetune.control import DEFAULT_ONLY, TRAINING_HELP
from .common import EXPORT_ONLY, AppContext, answered_in, json_safe, readable_errors, standalone

log = logging.getLogger(__name__)

TITLE = "Fine-tune"
START_QUEUE = "finetune"  # starting a job (quick checks); the training runs in a process of its own
POLL_SECONDS = 1.0
# The form's defaults: FinetuneConfig's, and the store export's (only, val_fraction) as `mmdemo finetune` has them.
DEFAULTS = dict(epochs=3, lr=5e-5, batch_size=8, val_fraction=0.1, only=DEFAULT_ONLY, training="auto")
TRAINING_CHOICES = [("Auto", "auto"), ("Full", "full"), ("LoRA adapter", "lora"), ("LoRA, merged", "merged")]
DESCRIPTION = (
    "Train a catalog model on the feedback people gave (their corrections, and results they approved) and "
    "add it to the catalog under a new name. The job runs as a process of its own (niced on CPU), one at a "
    "time per device while the others wait in order, and the app keeps answering meanwhile. It loads its own "
    "training copy of the base model (float32 weights, beside any copy the registry serves), so the device "
    "needs that much free memory. When it is "
    "done, reload the page to pick the new model in the tabs. Scripts: `/finetune_start`, `/finetune_status`, "
    "`/finetune_cancel`, `/finetune_resume` (admins)."
)
DONE = ("succeeded", "failed", "cancelled")


def with_message(info: dict[str, Any]) -> dict[str, Any]:
    info["message"] = status_text(info)
    return json_safe(info)


def available_text(ctx: AppContext, task: str | None, only: str | None) -> str:
    """How much feedback the run would learn from, said before it starts."""
    if not task:
        return ""
    only = only or DEFAULTS["only"]
    try:
        matching, total = ctx.finetune.available(task, only)
    except MMDemoError as exc:
        return f"*The feedback store is unavailable: {exc}*"
    if not matching:
        return (f"**No {only} feedback on {task} yet** ({total} feedback record(s) in all): rate or correct "
                "some results first.")
    return (f"**{matching} {only} feedback record(s)** on {task} to train on ({total} in all). Identical "
            "examples are merged; the validation fraction of the inputs is kept aside.")


# --- what the panel shows -------------------------------------------------------------------------------


def status_text(info: dict[str, Any]) -> str:
    """The job's status in Markdown."""
    state = info["state"]
    if state == "idle":
        return info["message"]
    name, base = info["name"], info["base"]
    who = f", started by {info['started_by']}" if info.get("started_by") else ""
    if state == "pending":
        lines = [f"**`{name}` is waiting** to fine-tune `{base}` ({info['task']}{who}): place {info['place']} in "
                 f"the queue for {info['device']}, where one job runs at a time."]
        if info.get("eta_seconds") is not None:
            lines.append(f"The job before it should end in about {_duration(info['eta_seconds'])}.")
        return "  \n".join(lines)
    if state == "running":
        lines = [f"**Fine-tuning `{name}`** from `{base}` ({info['task']}{who}, {info['seconds']:.0f} s so far, "
                 f"process {info['pid']})"]
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
    lines = [f"**Fine-tuning `{name}` failed:** {info['error']}"]
    if info.get("resumable"):
        lines.append("It left a checkpoint: **Resume** continues the run from there, with the same settings and data.")
    if info.get("log_tail"):
        lines.append("Last lines of its log:\n\n```\n" + "\n".join(info["log_tail"]) + "\n```")
    return "  \n".join(lines)


def progress_line(info: dict[str, Any]) -> str:
    stage = info["stage"]
    if stage in ("queued", "starting", "pending", "preparing"):
        return "Stage: **preparing** (exporting the feedback, loading the base model)"
    parts = [f"Stage: **{stage}**"]
    if info["epoch"]:  # the saving stage names no epoch
        parts.append(f"epoch {info['epoch']}/{info['epochs']}")
    if info["total_steps"]:
        parts.append(f"step {info['step']}/{info['total_steps']} ({info['step'] / info['total_steps']:.0%})")
    parts.append(f"train loss {_loss(info['train_loss'])}")
    parts.append(f"validation loss {_loss(info['val_loss'])}")
    if info.get("eta_seconds") is not None:
        parts.append(f"about {_duration(info['eta_seconds'])} left")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def job_report(info: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A succeeded job's before/after table, the note under it, and its loss curve (from the metrics its
    metrics.json holds, kept with the job in the store); hidden for any other job, or what it lacks."""
    from ..finetune.evaluate import before_after, loss_curve

    result = info.get("result") or {}
    metrics = result.get("metrics") if info["state"] == "succeeded" else None
    if not metrics:
        return gr.Dataframe(visible=False), gr.Markdown(visible=False), gr.LinePlot(visible=False)
    table = before_after(metrics, info["name"], info["task"])
    points = loss_curve(metrics)
    shown_table = (gr.Dataframe(pd.DataFrame(table["rows"], columns=table["headers"]), visible=True)
                   if table else gr.Dataframe(visible=False))
    note = ("  \n".join([table["source"], *([f"**Note:** {table['note']}"] if table["note"] else [])])
            if table else "")
    curve = (gr.LinePlot(pd.DataFrame(points, columns=["epoch", "loss", "split"]), visible=True)
             if points else gr.LinePlot(visible=False))
    return shown_table, gr.Markdown(note, visible=bool(note)), curve


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

    def start_job(task: str | None, base: str | None, name: str | None, epochs: Any, lr: Any, batch_size: Any,
                  val_fraction: Any, only: str | None, training: str | None,
                  request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "fine-tune models")
        config = ctx.finetune.config_from(task, base, name, epochs, lr, batch_size, val_fraction, only, training)
        return with_message(ctx.finetune.start(config, ctx.annotator_of(request)))

    def job_status(job_id: str | None, request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "follow fine-tuning jobs")
        return with_message(ctx.finetune.status(job_id))

    def cancel_job(job_id: str | None, request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "cancel fine-tuning jobs")
        if not job_id and not ctx.finetune.status()["queue"]:
            raise gr.Error("No fine-tuning job is running.", title="Nothing to cancel", print_exception=False)
        return with_message(ctx.finetune.cancel(job_id, ctx.annotator_of(request)))

    def resume_job(job_id: str | None, request: gr.Request | None) -> dict[str, Any]:
        ctx.require_admin(request, "resume fine-tuning jobs")
        return with_message(ctx.finetune.resume(job_id, ctx.annotator_of(request)))

    # -- the API --

    def finetune_start(task: str = "", base: str = "", name: str = "", epochs: int = DEFAULTS["epochs"],
                       lr: float = DEFAULTS["lr"], batch_size: int = DEFAULTS["batch_size"],
                       val_fraction: float = DEFAULTS["val_fraction"], only: str = DEFAULTS["only"],
                       training: str = DEFAULTS["training"], request: gr.Request = None) -> dict[str, Any]:
        """Start fine-tuning (admins): train `base` (a catalog model of `task`; default: the first the task
        can train) on the store's feedback (`only`: approved, corrected or all) into a new catalog model
        `name`. task: default the first that can be fine-tuned (image-to-text). Returns the job's status
        at once; the job is a process of its own, queued behind the jobs already waiting for the same
        device (one runs per device): follow it with /finetune_status and its job_id. training: auto (a LoRA
        adapter for large bases, else full), full, lora (an adapter served on the base's loaded copy) or
        merged (LoRA merged into a full checkpoint)."""
        return start_job(task, base, name, epochs, lr, batch_size, val_fraction, only, training, request)

    def finetune_status(job_id: str = "", request: gr.Request = None) -> dict[str, Any]:
        """A fine-tuning job's status (admins; job_id: default the newest job): state (idle, pending,
        running, succeeded, failed, cancelled), place in the queue while pending, stage, epoch/epochs,
        step/total_steps, train_loss, val_loss, eta_seconds, pid, exit_code, error and the log's last
        lines when it failed, the result (model, path, metrics, summary) when it succeeded; and the
        queue (the jobs waiting or running)."""
        return job_status(job_id, request)

    def finetune_cancel(job_id: str = "", request: gr.Request = None) -> dict[str, Any]:
        """Cancel a fine-tuning job (admins; job_id: default the newest waiting or running): a waiting
        job leaves the queue; a running one stops at its next step and publishes nothing."""
        return cancel_job(job_id, request)

    def finetune_resume(job_id: str = "", request: gr.Request = None) -> dict[str, Any]:
        """Resume a failed fine-tuning job (admins; job_id: default the newest job) from the last checkpoint
        its run left: a new job, queued like any other, continues it with the same settings and data and
        ends as the uninterrupted run would have. Refused for a job that did not fail or left no checkpoint."""
        return resume_job(job_id, request)

    gr.api(readable_errors(finetune_start), api_name="finetune_start", concurrency_id=START_QUEUE,
           concurrency_limit=1)
    gr.api(readable_errors(finetune_status), api_name="finetune_status", queue=False)
    gr.api(readable_errors(finetune_cancel), api_name="finetune_cancel", queue=False)
    gr.api(readable_errors(finetune_resume), api_name="finetune_resume", concurrency_id=START_QUEUE,
           concurrency_limit=1)

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
    training = gr.Radio(TRAINING_CHOICES, value=DEFAULTS["training"], label="Training", info=TRAINING_HELP[0].upper()
                        + TRAINING_HELP[1:] + ".", elem_classes="mmdemo-finetune-training")
    available = gr.Markdown(elem_classes="mmdemo-finetune-available")
    with gr.Row():
        start = gr.Button("Start fine-tuning", variant="primary")
        cancel = gr.Button("Cancel", variant="stop")
        resume = gr.Button("Resume", variant="secondary", visible=False, elem_classes="mmdemo-finetune-resume")
    answer = gr.Markdown(elem_classes="mmdemo-finetune-answer")  # what became of the last click
    status = gr.Markdown(elem_classes="mmdemo-finetune-status")
    evaluation = gr.Dataframe(label="Before / after fine-tuning", interactive=False, visible=False,
                              elem_classes="mmdemo-finetune-evaluation")
    evaluation_note = gr.Markdown(visible=False, elem_classes="mmdemo-finetune-evaluation-note")
    losses = gr.LinePlot(x="epoch", y="loss", color="split", title="Loss per epoch (0: the base)",
                         x_title="epoch", y_title="loss", visible=False, elem_classes="mmdemo-finetune-losses")
    with gr.Accordion("Job status (JSON)", open=False):
        details = gr.JSON(label="Job status", show_label=False)
    timer = gr.Timer(POLL_SECONDS, active=False)

    shown_in = [status, details, timer, evaluation, evaluation_note, losses, resume]

    def shown(info: dict[str, Any]) -> tuple[Any, ...]:
        """The status line, the JSON, the timer (polling while the job runs), a succeeded job's report, and
        the Resume button for a failed job that left a checkpoint."""
        return (info["message"], info, gr.Timer(active=info["state"] not in DONE + ("idle",)), *job_report(info),
                gr.Button(visible=bool(info.get("resumable"))))

    @readable_errors
    def page_load(request: gr.Request) -> tuple[Any, ...]:
        admin = ctx.role_of(request) == "admin"
        tasks = ctx.finetune.tasks()
        first = tasks[0] if tasks else None
        bases = ctx.finetune.base_models(first)
        info = job_status(None, request) if admin else {"state": "idle", "message": ""}
        return (access_text(ctx, request), gr.Dropdown(choices=tasks, value=first),
                gr.Dropdown(choices=bases, value=bases[0] if bases else None),
                available_text(ctx, first, DEFAULTS["only"]) if admin else "", *shown(info),
                gr.Button(interactive=admin), gr.Button(interactive=admin))

    @readable_errors
    def task_chosen(task_id: str | None, only_value: str | None, request: gr.Request) -> tuple[Any, str]:
        bases = ctx.finetune.base_models(task_id)
        admin = ctx.role_of(request) == "admin"
        return (gr.Dropdown(choices=bases, value=bases[0] if bases else None),
                available_text(ctx, task_id, only_value) if admin else "")

    @readable_errors
    def only_chosen(task_id: str | None, only_value: str | None, request: gr.Request) -> str:
        return available_text(ctx, task_id, only_value) if ctx.role_of(request) == "admin" else ""

    @answered_in(answer, "Not started")
    def start_clicked(task_id: str | None, base_id: str | None, new_name: str | None, n_epochs: Any, rate: Any,
                      size: Any, fraction: Any, only_value: str | None, mode: str | None,
                      request: gr.Request) -> tuple[Any, ...]:
        info = start_job(task_id, base_id, new_name, n_epochs, rate, size, fraction, only_value, mode, request)
        return "✓ Started: its progress follows below.", *shown(info)

    @answered_in(answer, "Not cancelled")
    def cancel_clicked(request: gr.Request) -> tuple[Any, ...]:
        info = cancel_job(None, request)
        return "Cancelling: the job stops at its next step and publishes nothing.", *shown(info)

    @answered_in(answer, "Not resumed")
    def resume_clicked(request: gr.Request) -> tuple[Any, ...]:
        info = resume_job(None, request)
        return "✓ Resumed: a new job continues from the last checkpoint.", *shown(info)

    @readable_errors
    def poll(task_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        info = job_status(None, request)
        # When a job has just ended, its model may be a base too: offer it (the value stays as chosen).
        refreshed = gr.Dropdown(choices=ctx.finetune.base_models(task_id)) if info["state"] in DONE else gr.skip()
        return *shown(info), refreshed

    quick = dict(queue=False, show_progress="hidden", api_visibility="private")
    # On page load only (no triggers, no inputs): the tasks, bases and counts of today, the job if any.
    gr.on(None, page_load, None, [access, task, base, available, *shown_in, start, cancel], **quick)
    task.input(task_chosen, [task, only], [base, available], **quick)
    only.input(only_chosen, [task, only], [available], **quick)
    # A refusal is said under the buttons (answer); the job's status stays as it was. Unprocessed: the run's
    # configuration judges the numbers (as for /finetune_start), not gradio's number boxes in a toast.
    start.click(start_clicked, [task, base, name, epochs, lr, batch_size, val_fraction, only, training],
                [answer, *shown_in], concurrency_id=START_QUEUE, concurrency_limit=1,
                show_progress="hidden", preprocess=False, api_visibility="private")
    cancel.click(cancel_clicked, None, [answer, *shown_in], queue=False, show_progress="hidden",
                 api_visibility="private")
    resume.click(resume_clicked, None, [answer, *shown_in], concurrency_id=START_QUEUE, concurrency_limit=1,
                 show_progress="hidden", api_visibility="private")
    timer.tick(poll, [task], [*shown_in, base], **quick)
    return SimpleNamespace(task=task, base=base, name=name, epochs=epochs, lr=lr, batch_size=batch_size,
                           val_fraction=val_fraction, only=only, training=training, available=available,
                           start=start, cancel=cancel,
                           answer=answer, status=status, details=details, timer=timer, access=access,
                           evaluation=evaluation, evaluation_note=evaluation_note, losses=losses,
                           resume=resume)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
