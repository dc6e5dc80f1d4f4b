"""Models panel: what the registry holds (device, memory, calls), the selected model's lineage and, for
admins, preload / unload, promotion to its task's default and rollback (:mod:`mmdemo.promotion`), the
feedback export (the same dataset as ``mmdemo export``, as a zip to download) and fine-tuning on that
feedback (:mod:`.finetune_panel`).

The leaderboard of each task from the blind votes of Compare mode (``/leaderboard``, anyone).

The audit log (admins): who exported, deleted, promoted, rolled back, preloaded, unloaded, fine-tuned or
created campaigns, and when (:mod:`mmdemo.feedback.audit`).

API: ``/models_status`` and ``/leaderboard`` (anyone), ``/preload_model``, ``/unload_model``, ``/promote``,
``/rollback``, ``/export_feedback`` and ``/audit_log`` (admins), and the fine-tuning endpoints of
:mod:`.finetune_panel`.
"""

from __future__ import annotations

import html
from types import SimpleNamespace
from typing import Any

import gradio as gr

from .. import tasks
from ..errors import InvalidInputError, MMDemoError
from ..feedback.audit import ACTIONS, HEADERS as AUDIT_HEADERS, AuditLog, check_action, check_limit
from ..feedback.store import parse_since
from ..promotion import describe_lineage, model_lineage
from . import finetune_panel
from .messages import validation_results
from .common import (ADMIN_QUEUE, EXPORT_ONLY, AppContext, answered_in, format_bytes, readable_errors, standalone,
                     validated_api)

TITLE = "Models"
HEADERS = ["model", "state", "task", "device", "dtype", "memory", "calls", "idle (s)"]  # state 2nd: seen on phones
HISTORY_HEADERS = ["when", "action", "from", "to", "by"]  # a task's promotions and rollbacks, newest first
EXPORT_QUEUE = "export"  # one export at a time, beside preload / unload
# The store's formats and filters, with labels (mmdemo.feedback is imported on first use: start-up time).
EXPORT_FORMATS = [("datasets (load_from_disk)", "datasets"), ("Parquet", "parquet"), ("JSON Lines", "jsonl")]
NOT_AUDITED = " *(It could not be written to the audit log: see the server log.)*"


# A model that is not loaded: where it would load from (see ModelRegistry.availability).
NOT_LOADED_STATES = {"local": "not loaded", "hub": "not downloaded", "unavailable": "unavailable"}


def status_rows(ctx: AppContext) -> list[list[Any]]:
    """One row per catalog model, loaded or not."""
    status = ctx.registry.status()
    loaded = {entry["id"]: entry for entry in status["loaded"]}
    rows = []
    for spec in ctx.registry.catalog:
        entry = loaded.get(spec.id)
        if entry is not None:
            state = "in use" if entry["in_use"] else "loaded"
            rows.append([spec.id, state, spec.task, entry["device"], entry["dtype"],
                         format_bytes(entry["memory_bytes"]), entry["calls"], entry["idle_seconds"]])
            continue
        state = ("loading" if spec.id in status["loading"] else "failed" if spec.id in status["errors"]
                 else NOT_LOADED_STATES[ctx.registry.availability(spec)])
        rows.append([spec.id, state, spec.task, "", "", "", 0, ""])
    return rows


def summary(ctx: AppContext, request: gr.Request | None = None) -> str:
    status = ctx.registry.status()
    budget = format_bytes(status["budget_bytes"]) if status["budget_bytes"] else "not set yet"
    lines = [f"**Device:** {status['device']} · **memory budget:** {budget} · "
             f"**used:** {format_bytes(status['used_bytes'])} · **model calls at once:** {ctx.concurrency} · "
             f"**batch size:** up to {ctx.settings.max_batch} · **queue:** up to {ctx.settings.max_queue}"]
    hub = ctx.registry.hub.last_known()
    if hub is not None and not hub.reachable and any(spec.source_scheme == "hf-hub" for spec in ctx.registry.catalog):
        lines.append(f"**The Hub cannot be reached** ({hub.reason}): only models available locally can load.")
    for model_id, error in status["errors"].items():
        lines.append(f"- **{model_id}** failed to load: {error}")
    promoted = [f"{task}: **{model_id}**" for task in tasks.task_ids()
                if (model_id := ctx.registry.catalog.promoted(task))]
    if promoted:
        lines.append("**Promoted defaults:** " + " · ".join(promoted))
    for task, problem in ctx.defaults.problems().items():
        lines.append(f"- **{task}**: {problem}")
    if ctx.sync is not None:
        lines.append(f"**Labels sync:** {ctx.sync.describe()}")
    if ctx.auth is None and ctx.role_of(request) == "admin":
        lines.append("*You are an admin here: this browser opened the admin link. Preload, unload, the feedback "
                     "export and fine-tuning are yours.*")
    elif ctx.auth is None:
        lines.append("*Read-only: preload, unload, the feedback export and fine-tuning need an admin. This app "
                     "has no login, so an admin is whoever opens the admin link mmdemo printed when it started "
                     "(`/admin-login?token=...`, in the server's output). Or set MMDEMO_AUTH_FILE and sign in as "
                     "an admin.*")
    else:
        lines.append("*Preload, unload and the feedback export need a user with the admin role.*")
    return "\n\n".join(lines)


def leaderboard_of(ctx: AppContext, task: str) -> tuple[str, dict[str, Any]]:
    """The task's leaderboard from the blind votes: a plot of the ratings with their 95% intervals, and
    the table (model, rating, interval, win rate, games, W-T-L, evaluation)."""
    from ..feedback.comparisons import ComparisonStore
    from ..feedback.leaderboard import leaderboard, table

    task = tasks.task_spec(task).id
    standings = leaderboard(ComparisonStore(ctx.store).games(task), catalog=ctx.registry.catalog)
    headers, rows = table(standings)
    return rating_plot(standings, task), {"headers": headers, "data": rows}


def rating_plot(standings: list[Any], task: str) -> str:
    """Ratings as dots with their 95% interval as a bar, one line per model (an SVG: no plotting library)."""
    if not standings:
        return f"<p class='mmdemo-note'>No votes on {html.escape(task)} yet: use Compare in its tab.</p>"
    low = min(s.low for s in standings) - 20
    high = max(s.high for s in standings) + 20
    width, left, line = 640, 200, 28

    def x(rating: float) -> float:
        return left + (rating - low) / (high - low) * (width - left - 20)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' class='mmdemo-leaderboard-plot' role='img' "
             f"aria-label='Ratings with 95% intervals' viewBox='0 0 {width} {line * len(standings) + 30}' "
             f"width='100%' style='max-width:{width}px;font-size:12px'>"]
    for i, s in enumerate(standings):
        y = 20 + i * line
        parts.append(f"<text x='{left - 8}' y='{y + 4}' text-anchor='end' fill='currentColor'>"
                     f"{html.escape(s.model)}</text>"
                     f"<line x1='{x(s.low):.1f}' x2='{x(s.high):.1f}' y1='{y}' y2='{y}' stroke='#6366f1' "
                     f"stroke-width='3'><title>95% interval {s.low:.0f} to {s.high:.0f}</title></line>"
                     f"<circle cx='{x(s.rating):.1f}' cy='{y}' r='5' fill='#312e81'>"
                     f"<title>{html.escape(s.model)}: {s.rating:.0f}</title></circle>")
    axis_y = 20 + len(standings) * line - 10
    for tick in (low + 20, (low + high) / 2, high - 20):
        parts.append(f"<text x='{x(tick):.1f}' y='{axis_y + 14}' text-anchor='middle' fill='currentColor' "
                     f"opacity='0.6'>{tick:.0f}</text>")
    parts.append("</svg>")
    return "".join(parts)


def build(ctx: AppContext) -> SimpleNamespace:
    def refresh(request: gr.Request) -> tuple[str, list[list[Any]]]:
        return summary(ctx, request), status_rows(ctx)

    def preload_model(model: str, request: gr.Request) -> tuple[str, str, list[list[Any]]]:
        ctx.require_admin(request)
        ctx.registry.preload([model])
        audited = ctx.audit(request, "preload", model)
        return f"{model} is loaded." + ("" if audited else NOT_AUDITED), *refresh(request)

    def unload_model(model: str, request: gr.Request) -> tuple[str, str, list[list[Any]]]:
        ctx.require_admin(request)
        done = ctx.registry.unload(model)
        if not done:
            return f"{model} was not loaded.", *refresh(request)
        audited = ctx.audit(request, "unload", model)
        return f"{model} is unloaded." + ("" if audited else NOT_AUDITED), *refresh(request)

    def promote(model: str, request: gr.Request) -> tuple[str, str, list[list[Any]]]:
        ctx.require_admin(request, "promote models")
        record = ctx.defaults.promote(model, ctx.annotator_of(request))
        return (f"{model} is now the default of {record.task} (before: "
                f"{record.previous_model_id or 'the catalog default'})."), *refresh(request)

    def rollback(task: str, request: gr.Request) -> tuple[str, str, list[list[Any]], list[list[Any]]]:
        ctx.require_admin(request, "roll back models")
        record = ctx.defaults.rollback(task, ctx.annotator_of(request))
        now = record.model_id or f"its catalog default, {ctx.registry.catalog.default_for(record.task).id}"
        return f"{record.task} is back to {now} ({record.previous_model_id} rolled back).", *refresh(request), \
            history_rows(ctx, record.task)

    def export_feedback(task: str, format: str, only: str, request: gr.Request) -> tuple[str, str]:
        ctx.require_admin(request, "export feedback")
        from ..feedback import export_archive

        archive = export_archive(ctx.store, task, ctx.output_dir(), format=format, only=only,
                                 actor=ctx.annotator_of(request))
        return str(archive), f"Exported {only} feedback on {task} as {format}: {format_bytes(archive.stat().st_size)}."

    ids = [spec.id for spec in ctx.registry.catalog]
    info = gr.Markdown()
    table = gr.Dataframe(headers=HEADERS, label="Catalog and registry", interactive=False, wrap=True)
    with gr.Row():
        model = gr.Dropdown(ids, value=ids[0] if ids else None, label="Model", scale=3)
        preload = gr.Button("Preload", variant="primary", scale=1)
        unload = gr.Button("Unload", variant="stop", scale=1)
        promote_button = gr.Button("Promote", scale=1)
        refresh_button = gr.Button("Refresh", scale=1)
    message = gr.Markdown(elem_classes="mmdemo-models-message")
    lineage = gr.Markdown(elem_classes="mmdemo-lineage")
    with gr.Accordion("Default models: history and rollback (admins)", open=False, elem_id="mmdemo-defaults"):
        with gr.Row():
            defaults_task = gr.Dropdown(list(tasks.task_ids()), value=tasks.task_ids()[0], label="Task", scale=3)
            rollback_button = gr.Button("Roll back", variant="stop", scale=1)
        rollback_message = gr.Markdown(elem_classes="mmdemo-rollback-message")
        history = gr.Dataframe(headers=HISTORY_HEADERS, label="Promotions", interactive=False, wrap=True)
    with gr.Accordion("Export feedback (admins)", open=False, elem_id="mmdemo-export"):
        with gr.Row():
            export_task = gr.Dropdown(list(tasks.task_ids()), value=tasks.task_ids()[0], label="Task")
            export_format = gr.Dropdown(EXPORT_FORMATS, value="datasets", label="Format")
            export_only = gr.Dropdown(EXPORT_ONLY, value="approved", label="Records")
        export = gr.Button("Export")
        export_message = gr.Markdown(elem_classes="mmdemo-export-message")
        archive = gr.File(label="Export (zip)", interactive=False)
    with gr.Accordion("Audit log (admins)", open=False, elem_id="mmdemo-audit"):
        with gr.Row():
            audit_action = gr.Dropdown([("every action", "")] + [(a, a) for a in ACTIONS], value="",
                                       label="Action", scale=2)
            audit_actor = gr.Textbox(label="Actor", placeholder="anyone", scale=2)
            audit_since = gr.Textbox(label="Since", placeholder="YYYY-MM-DD", scale=2)
            audit_limit = gr.Number(100, label="At most", precision=0, minimum=1, scale=1)
            audit_show = gr.Button("Show", scale=1)
        audit_message = gr.Markdown(elem_classes="mmdemo-audit-message")
        audit_table = gr.Dataframe(headers=AUDIT_HEADERS, label="Audit log, newest first", interactive=False,
                                   wrap=True)
    with gr.Accordion("Fine-tune on feedback (admins)", open=False, elem_id="mmdemo-finetune"):
        finetune = finetune_panel.build(ctx)
    with gr.Accordion("Leaderboard (blind votes)", open=False, elem_id="mmdemo-leaderboard"):
        gr.Markdown("Ratings from the votes given in each tab's **Compare** mode (Bradley-Terry on the Elo scale: "
                    "+400 is ten times the odds of winning; a tie counts half), with 95% bootstrap intervals, next "
                    "to each fine-tuned model's evaluation on labelled data.", elem_classes="mmdemo-note")
        with gr.Row():
            board_task = gr.Dropdown(list(tasks.task_ids()), value=tasks.task_ids()[0], label="Task", scale=3)
            board_refresh = gr.Button("Refresh", scale=1)
        board_plot = gr.HTML(elem_classes="mmdemo-leaderboard")
        board_table = gr.Dataframe(label="Leaderboard", interactive=False, wrap=True)

    # On page load (no triggers, no inputs), on the Refresh button, and after each action:
    gr.on(None, refresh, None, [info, table], queue=False, show_progress="hidden", api_visibility="private")
    # On page load: today's catalog (a fine-tuned model joins it while the app runs); the value stays.
    gr.on(None, lambda: gr.Dropdown(choices=[spec.id for spec in ctx.registry.catalog]), None, [model],
          queue=False, show_progress="hidden", api_visibility="private")
    refresh_button.click(refresh, None, [info, table], api_name="models_status", queue=False)
    admin = dict(concurrency_id=ADMIN_QUEUE, concurrency_limit=1)
    exporting = dict(concurrency_id=EXPORT_QUEUE, concurrency_limit=1)
    # Each action twice: the API endpoint (no trigger: a refusal is an error for the client), and the button,
    # whose refusal is said beside it. Unprocessed: a model id is checked against today's catalog, not the
    # choices the page was built with.
    for action, button, refused in ((preload_model, preload, "Not loaded"), (unload_model, unload, "Not unloaded"),
                                    (promote, promote_button, "Not promoted")):
        gr.on([], readable_errors(action), model, [message, info, table], api_name=action.__name__,
              preprocess=False, **admin)
        clicked = button.click(answered_in(message, refused)(action), model, [message, info, table],
                               preprocess=False, api_visibility="private", **admin)
        clicked.then(lambda model_id: lineage_text(ctx, model_id), model, [lineage], preprocess=False, queue=False,
                     show_progress="hidden", api_visibility="private")
    rollback_outputs = [rollback_message, info, table, history]
    gr.on([], readable_errors(rollback), defaults_task, rollback_outputs, api_name="rollback", **admin)
    rollback_button.click(answered_in(rollback_message, "Not rolled back")(rollback), defaults_task, rollback_outputs,
                          api_visibility="private", **admin)
    # On page load and when the selection changes: the model's lineage, the task's promotions.
    gr.on(None, lambda model_id: lineage_text(ctx, model_id), model, [lineage], preprocess=False, queue=False,
          show_progress="hidden", api_visibility="private")
    gr.on(None, lambda task: history_rows(ctx, task), defaults_task, [history], queue=False, show_progress="hidden",
          api_visibility="private")
    export_inputs = [export_task, export_format, export_only]
    gr.on([], readable_errors(export_feedback), export_inputs, [archive, export_message], api_name="export_feedback",
          **exporting)
    export.click(answered_in(export_message, "Not exported")(export_feedback), export_inputs, [archive, export_message],
                 api_visibility="private", **exporting)

    def audit_log(since: str = "", action: str = "", actor: str = "", limit: float = 100,
                  request: gr.Request = None) -> list[dict[str, Any]]:
        """The audit log, newest first (admins): who did which action, on what, when. since: YYYY-MM-DD or an
        ISO time ("": any); action: one action ("": all); actor: one login name or visitor id ("": anyone);
        limit: at most this many entries (1 to 10000)."""
        return [entry.to_dict() for entry in audit_entries(ctx, request, since, action, actor, limit)]

    def show_audit_log(action: str, actor: str, since: str, limit: float | None,
                       request: gr.Request) -> tuple[str, list[list[Any]]]:
        entries = audit_entries(ctx, request, since, action, actor, limit)
        return f"{len(entries)} entries.", [entry.row() for entry in entries]

    validated_api(readable_errors(audit_log), audit_validator, api_name="audit_log", concurrency_id="audit",
                  concurrency_limit=4)
    audit_show.click(answered_in(audit_message, "Not shown")(show_audit_log),
                     [audit_action, audit_actor, audit_since, audit_limit], [audit_message, audit_table],
                     api_visibility="private", concurrency_id="audit", concurrency_limit=4)

    def show_leaderboard(task: str) -> tuple[str, dict[str, Any]]:
        return leaderboard_of(ctx, task)

    gr.on([board_task.change, board_refresh.click], readable_errors(show_leaderboard), board_task,
          [board_plot, board_table], api_name="leaderboard", concurrency_id="leaderboard")
    return SimpleNamespace(info=info, table=table, model=model, preload=preload, unload=unload,
                           refresh=refresh, refresh_button=refresh_button, message=message, export=export,
                           archive=archive, export_message=export_message, finetune=finetune,
                           promote=promote_button, lineage=lineage, defaults_task=defaults_task,
                           rollback=rollback_button, rollback_message=rollback_message, history=history,
                           board_task=board_task, board_refresh=board_refresh, board_plot=board_plot,
                           board_table=board_table, audit_show=audit_show, audit_message=audit_message,
                           audit_table=audit_table)


def audit_entries(ctx: AppContext, request: Any, since: Any, action: Any, actor: Any, limit: Any) -> list[Any]:
    """The audit log's entries for an admin (:class:`~mmdemo.errors.NotAllowedError` for anyone else)."""
    ctx.require_admin(request, "read the audit log")
    return AuditLog(ctx.store).entries(since=parse_since(since) if since else None, action=action or None,
                                       actor=actor or None, limit=limit)


def audit_validator(since: Any = "", action: Any = "", actor: Any = "", limit: Any = 100) -> list[dict[str, Any]]:
    """``/audit_log``'s checks before queueing: a date, a known action, text, a limit in range."""

    def text(value: Any) -> None:
        if value is not None and not isinstance(value, str):
            raise InvalidInputError("The actor must be text: a login name or a visitor id.", field="actor")

    return validation_results([lambda: since and parse_since(since), lambda: action and check_action(action),
                               lambda: text(actor), lambda: check_limit(limit)])


def lineage_text(ctx: AppContext, model_id: str | None) -> str:
    """The lineage of catalog model ``model_id`` (:func:`mmdemo.promotion.describe_lineage`), or why it
    cannot be shown."""
    if not model_id or model_id not in ctx.registry.catalog:
        return ""
    try:
        return describe_lineage(model_lineage(ctx.registry.catalog.get(model_id), ctx.defaults.promotions))
    except MMDemoError as exc:
        return f"*The lineage of {model_id} cannot be shown: {exc}*"


def history_rows(ctx: AppContext, task: str) -> list[list[Any]]:
    """The promotions and rollbacks of ``task``, newest first (none while the store cannot be read)."""
    try:
        records = ctx.defaults.promotions.history(task)
    except MMDemoError:
        return []
    return [[record.created_at.strftime("%Y-%m-%d %H:%M:%S"), record.action,
             record.previous_model_id or "(catalog default)", record.model_id or "(catalog default)",
             record.actor or ""] for record in records]


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
