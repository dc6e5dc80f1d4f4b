"""Annotate tab: annotators work through batches of a campaign, one item at a time.

Pick a campaign, **Get a batch** (its items are leased to you: nobody else gets them while you hold
them), then for each item see its input, the model's output as a suggestion and the campaign's
instructions; correct it with the widgets of the task (the same as the feedback row under every tab)
and **Submit & next**, or **Skip** (the item goes back to the others). A submit saves an ordinary
feedback record, so the export takes it as it takes any feedback.

Admins create campaigns from recorded outputs and follow progress per annotator in the accordion
below. Annotation needs a login with the ``annotator`` or ``admin`` role (or, without an auth file,
an app that only this machine can reach). The logic lives in :mod:`mmdemo.feedback.annotation`.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..errors import MMDemoError
from ..tasks.base import require_int
from ..tasks.spec import task_spec, task_specs
from .common import AppContext, answered_in, json_safe, readable_errors, standalone, validated_api
from .feedback import correction_for, feedback_validator

if TYPE_CHECKING:
    from ..feedback import AnnotationQueue, OutputRecord

TITLE = "Annotate"
ROLES = ("annotator", "admin")
ANNOTATE_QUEUE = "annotate"  # quick database work, beside the model queue
NEED_LOGIN = ("**Annotation is for annotators.** Sign in with an account whose role is `annotator` or "
              "`admin` (with an auth file: `MMDEMO_AUTH_FILE`), or, where the app has no login, open the admin "
              "link it printed at start-up (see README, Login).")
INPUT_NAMES = {"question": "Question", "labels": "Labels offered", "prompt": "Prompt",
               "negative_prompt": "Negative prompt", "prefix": "Caption prefix", "language": "Language"}
VERDICTS = [("Right", "up"), ("Wrong", "down")]


def queue_of(ctx: AppContext) -> "AnnotationQueue":
    from ..feedback import AnnotationQueue

    return AnnotationQueue(ctx.store)


def require_annotator(ctx: AppContext, request: gr.Request | None) -> str:
    """The caller's annotator id; a readable ``gr.Error`` unless they may annotate."""
    if ctx.role_of(request) not in ROLES:
        raise gr.Error(NEED_LOGIN.replace("**", "").replace("`", ""), title="Not allowed", print_exception=False)
    annotator = ctx.annotator_of(request)
    if annotator is None:
        raise gr.Error("Annotation needs a browser session or a login.", title="Not allowed", print_exception=False)
    return annotator


def batch_size(n: Any) -> int:
    """How many items to lease: a whole number from 1 to the queue's limit (None: the default, 10)."""
    from ..feedback.annotation import DEFAULT_BATCH, MAX_BATCH

    return DEFAULT_BATCH if n is None or n == "" else require_int(n, "n", 1, MAX_BATCH, what="batch size")


def signed_in_text(ctx: AppContext, request: gr.Request | None) -> str:
    """Whom the labels are saved as: the login, or this browser session when nobody signed in."""
    name = getattr(request, "username", None)
    if name:
        return f"Signed in as **{name}**."
    return (f"Not signed in: your labels are saved as **{ctx.annotator_of(request)}**, the anonymous id of this "
            "browser session.")


# --- what an item looks like ---------------------------------------------------------------------------


def suggestion_of(output: "OutputRecord") -> dict[str, Any]:
    """The model's output as the correction widgets read it (text-to-image: its images by ref)."""
    result = dict(output.output)
    media = task_spec(output.task).schema.output_media
    if media:
        result[media] = list(output.output_media)
    return result


def suggestion_text(output: "OutputRecord") -> str:
    model = output.model_id or "the model"
    text = task_spec(output.task).schema.suggestion(output.output)
    if text is not None:
        return f"**{model} suggests:** {text}"
    return f"**{model} made these images;** rate them (1-5) and choose the best."


def inputs_text(output: "OutputRecord") -> str:
    lines = []
    for name, value in output.inputs.items():
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        lines.append(f"**{INPUT_NAMES.get(name, name)}:** {shown}")
    return "  \n".join(lines)


def progress_summary(progress: Any) -> str:
    """A campaign's progress for admins, in Markdown."""
    c = progress.campaign
    lines = [f"**{c.name}** ({c.task}, {c.labels_per_item} label(s) per item): **{progress.labels_done}/"
             f"{progress.labels_wanted} labels** · {progress.complete_items}/{progress.items} items complete · "
             f"{progress.items_needing_labels} need more labels · {progress.leased_items} held now"]
    if progress.agreement is not None:
        lines.append(f"Agreement: {progress.agreeing}/{progress.multiply_labelled} items with several labels "
                     f"agree ({progress.agreement:.0%}).")
    return "  \n".join(lines)


def media_copy(ctx: AppContext, ref: str) -> str:
    """A copy of a stored media file where gradio may serve it from (the app's output folder)."""
    target = ctx.output_path("annotate", "." + ref.rsplit(".", 1)[-1])
    shutil.copyfile(ctx.store.media_path(ref), target)
    return str(target)


# --- the tab --------------------------------------------------------------------------------------------


def build(ctx: AppContext) -> SimpleNamespace:
    task_ids = [spec.id for spec in task_specs() if spec.tab]
    batch = gr.State({})  # this session's batch: campaign, task, instructions, output ids, position
    intro = gr.Markdown(elem_classes="mmdemo-annotate-intro")
    with gr.Row(equal_height=True):
        campaign = gr.Dropdown([], value=None, label="Campaign", scale=3, interactive=True)
        size = gr.Number(10, label="Batch size", precision=0, minimum=1, maximum=100, scale=1)
        get = gr.Button("Get a batch", variant="primary", scale=1)
    progress_line = gr.Markdown(elem_classes=["mmdemo-note", "mmdemo-annotate-batch"])  # Get a batch answers here
    with gr.Column(visible=False) as item_box:
        position = gr.Markdown(elem_classes="mmdemo-annotate-position")
        instructions = gr.Markdown()
        with gr.Row(equal_height=False):
            with gr.Column():
                image = gr.Image(label="Input image", interactive=False, visible=False, height=320)
                audio = gr.Audio(label="Input audio", interactive=False, visible=False)
                gallery = gr.Gallery(label="Generated images", visible=False, columns=4, height=260)
                given = gr.Markdown()
            with gr.Column():
                suggestion = gr.Markdown(elem_classes="mmdemo-annotate-suggestion")
                verdict = gr.Radio(VERDICTS, value=None, label="Is the suggestion right? (optional)")
                columns, corrections = {}, {}
                for task in task_ids:
                    with gr.Column(visible=False) as columns[task]:
                        corrections[task] = correction_for(task)
                comment = gr.Textbox("", label="Comment (optional)", lines=1)
                gr.Markdown("*Submitting with nothing changed or chosen accepts the suggestion (as **Right**).*",
                            elem_classes="mmdemo-note")
                with gr.Row():
                    submit = gr.Button("Submit & next", variant="primary")
                    skip = gr.Button("Skip")
                status = gr.Markdown(elem_classes="mmdemo-annotate-status")
    with gr.Accordion("Campaigns and progress (admins)", open=False):
        with gr.Row():
            new_name = gr.Textbox("", label="Campaign name", scale=2)
            new_task = gr.Dropdown(task_ids, value=task_ids[0], label="Task", scale=2)
            new_labels = gr.Number(1, label="Labels per item", precision=0, minimum=1, maximum=20, scale=1)
            new_lease = gr.Number(30, label="Lease (minutes)", minimum=1, scale=1)
        new_instructions = gr.Textbox("", label="Instructions for annotators", lines=2)
        with gr.Row():
            new_model = gr.Dropdown([("any model", "")] + [(spec.id, spec.id) for spec in ctx.registry.catalog],
                                    value="", label="Only outputs of this model", scale=2)
            new_since = gr.Textbox("", label="Recorded since (YYYY-MM-DD, optional)", scale=2)
            new_unrated = gr.Checkbox(True, label="Only outputs without feedback", scale=1)
        create = gr.Button("Create campaign from recorded outputs")
        admin_message = gr.Markdown(elem_classes="mmdemo-annotate-admin")
        show_progress = gr.Button("Show progress of the campaign above")
        summary = gr.Markdown(elem_classes="mmdemo-annotate-progress")
        table = gr.Dataframe(headers=["annotator", "done", "skipped", "held now", "last submit (UTC)"],
                             label="Per annotator", interactive=False, elem_classes="mmdemo-annotate-table")

    correction_components = [c for task in task_ids for c in corrections[task].components]
    item_outputs = [item_box, position, instructions, image, audio, gallery, given, suggestion, verdict,
                    *columns.values(), *correction_components, comment, status]

    # -- showing the current item --

    def item_view(state: dict[str, Any]) -> list[Any]:
        """The values of ``item_outputs`` for the item at ``state['index']`` (hidden when done)."""
        ids, index = state.get("ids") or [], state.get("index", 0)
        if index >= len(ids):
            hidden = [gr.Column(visible=False)] + [gr.skip()] * (len(item_outputs) - 1)
            return hidden
        output = ctx.store.get_output(ids[index])
        task = output.task
        schema = task_spec(task).schema
        heard = task_spec(task).input_kind == "audio"
        given = media_copy(ctx, output.input_media[0]) if output.input_media else None
        values: dict[Any, Any] = {
            item_box: gr.Column(visible=True),
            position: f"**Item {index + 1} of {len(ids)}** · {state['campaign']}",
            instructions: state.get("instructions") or "",
            image: gr.Image(value=None if heard else given, visible=bool(given) and not heard),
            audio: gr.Audio(value=given if heard else None, visible=heard),
            gallery: gr.Gallery(value=[media_copy(ctx, ref) for ref in output.output_media] or None,
                                visible=bool(output.output_media)),
            given: inputs_text(output),
            suggestion: suggestion_text(output),
            verdict: None,
            comment: "",
            status: "",
        }
        for other, column in columns.items():
            values[column] = gr.Column(visible=other == task)
        shown = suggestion_of(output)
        if given and schema.media_input:  # the widgets see the input too (a box editor draws on the image)
            shown[schema.media_input] = given
        filled = dict(zip(corrections[task].components, corrections[task].fill(shown)))
        return [values.get(c, filled.get(c, gr.skip())) for c in item_outputs]

    def progress_text(name: str, annotator: str) -> str:
        progress = queue_of(ctx).progress(name)
        mine = next((w for w in progress.annotators if w.annotator == annotator), None)
        return (f"{progress.campaign.name}: {progress.labels_done}/{progress.labels_wanted} labels, "
                f"{progress.complete_items}/{progress.items} items complete · you: "
                f"{mine.done if mine else 0} done, {mine.leased if mine else 0} held")

    # -- handlers --

    def load(request: gr.Request) -> tuple[Any, Any]:
        if ctx.role_of(request) not in ROLES:
            return NEED_LOGIN, gr.Dropdown(choices=[], value=None)
        try:
            names = [c.name for c in queue_of(ctx).campaigns()]
        except Exception as exc:  # the store is unavailable: say so, keep the page usable
            return f"**The annotation campaigns are unavailable:** {exc}", gr.Dropdown(choices=[], value=None)
        text = signed_in_text(ctx, request) + " " + (
            "Pick a campaign and get a batch: its items are yours until you submit or skip them (or the lease "
            "runs out)." if names else
            "No annotation campaigns yet: an admin creates one below or with `mmdemo annotate create`.")
        return text, gr.Dropdown(choices=names, value=names[0] if names else None)

    @answered_in(progress_line)
    def get_batch(name: str | None, n: float | None, request: gr.Request) -> list[Any]:
        annotator = require_annotator(ctx, request)
        if not name:
            raise gr.Error("Choose a campaign first.", title="No campaign", print_exception=False)
        queue = queue_of(ctx)
        items = queue.next_batch(name, annotator, batch_size(n))
        found = queue.campaign(name)
        state = {"campaign": found.name, "task": found.task, "instructions": found.instructions,
                 "ids": [item.output_id for item in items], "index": 0}
        line = progress_text(found.name, annotator)
        if not items:
            line = "**Nothing left for you in this campaign.** " + line
        return [state, line, *item_view(state)]

    def advance(state: dict[str, Any], request: gr.Request, message: str) -> list[Any]:
        """The next item; ``message`` says what became of the item just done, naming it (it is shown under
        the next one)."""
        state = {**state, "index": state.get("index", 0) + 1}
        view = item_view(state)
        annotator = ctx.annotator_of(request)
        line = progress_text(state["campaign"], annotator)
        if state["index"] >= len(state.get("ids") or []):
            line = f"{message} **Batch done.** Get a batch for more.  \n" + line
        else:
            view[-1] = message
        return [state, line, *view]

    @answered_in(status, "Not saved")
    def submit_item(values: dict[Any, Any], request: gr.Request) -> list[Any]:
        annotator = require_annotator(ctx, request)
        state = values[batch] or {}
        ids, index = state.get("ids") or [], state.get("index", 0)
        if index >= len(ids):
            raise gr.Error("There is no item to submit: get a batch first.", print_exception=False)
        output = ctx.store.get_output(ids[index])
        widgets = corrections[output.task]
        # A refusal is said beside the item (answered_in), which stays: fix it, or skip.
        correction = widgets.read(suggestion_of(output), [values[c] for c in widgets.components])
        thumbs = {"up": 1, "down": -1}.get(values[verdict])
        saved = queue_of(ctx).submit(state["campaign"], ids[index], annotator, thumbs=thumbs,
                                     correction=correction, comment=values[comment])
        return advance(state, request, f"✓ **Item {index + 1}:** {saved.message}.")

    @answered_in(status, "Not skipped")
    def skip_item(state: dict[str, Any], request: gr.Request) -> list[Any]:
        annotator = require_annotator(ctx, request)
        ids, index = state.get("ids") or [], state.get("index", 0)
        if index >= len(ids):
            raise gr.Error("There is no item to skip: get a batch first.", print_exception=False)
        queue_of(ctx).skip(state["campaign"], ids[index], annotator)
        return advance(state, request, f"**Item {index + 1}:** skipped.")

    @answered_in(admin_message, "Not created")
    def create_campaign(name: str, task: str, labels: float | None, lease: float | None, text: str, model: str,
                        since: str, unrated: bool, request: gr.Request) -> tuple[Any, Any]:
        from ..feedback.store import parse_since

        ctx.require_admin(request, "create annotation campaigns")
        if model:
            ctx.registry.catalog.get(model, task)  # known, and of this task
        since = since.strip()
        if since:
            parse_since(since)  # a bad date is refused before the campaign exists
        queue = queue_of(ctx)
        created = queue.create_campaign(name, task, instructions=text or "", labels_per_item=1 if labels is None else int(labels),
                                        model=model or None, lease_minutes=30.0 if lease is None else float(lease),
                                        created_by=ctx.annotator_of(request))
        added = queue.add_recorded(created.id, model=model or None, since=since or None,
                                   without_feedback=bool(unrated), actor=ctx.annotator_of(request))
        names = [c.name for c in queue.campaigns()]
        message = f"Created **{created.name}** ({created.task}) with {added} item(s)."
        if not added:
            message = (f"Created **{created.name}** ({created.task}), but **it has no items**: no recorded "
                       f"{created.task} output matches the choices above. Annotators get nothing from it until "
                       f"items are added, on the server: `mmdemo annotate add {created.name}`.")
        return message, gr.Dropdown(choices=names, value=created.name)

    @answered_in(summary)
    def campaign_progress(name: str | None, request: gr.Request) -> tuple[str, list[list[Any]]]:
        ctx.require_admin(request, "see the progress of every annotator")
        if not name:
            raise gr.Error("Choose a campaign first.", title="No campaign", print_exception=False)
        progress = queue_of(ctx).progress(name)
        rows = [[w.annotator, w.done, w.skipped, w.leased,
                 w.last_done_at.strftime("%Y-%m-%d %H:%M") if w.last_done_at else ""] for w in progress.annotators]
        return progress_summary(progress), rows

    quiet = dict(queue=False, show_progress="minimal", api_visibility="private")
    gr.on(None, load, None, [intro, campaign], queue=False, show_progress="hidden", api_visibility="private")
    # Unprocessed (here and for create): an out-of-range number is refused by the queue, beside the button,
    # not by gradio's number box in a toast.
    get.click(get_batch, [campaign, size], [batch, progress_line, *item_outputs], preprocess=False, **quiet)
    submit.click(submit_item, {batch, verdict, comment, *correction_components}, [batch, progress_line, *item_outputs],
                 **quiet)
    skip.click(skip_item, [batch], [batch, progress_line, *item_outputs], **quiet)
    create.click(create_campaign, [new_name, new_task, new_labels, new_lease, new_instructions, new_model, new_since,
                                   new_unrated], [admin_message, campaign], preprocess=False, **quiet)
    show_progress.click(campaign_progress, [campaign], [summary, table], **quiet)
    return SimpleNamespace(campaign=campaign, get=get, item_box=item_box, submit=submit, skip=skip, status=status,
                           progress_line=progress_line, create=create, summary=summary, table=table, intro=intro)


# --- the API: the same work for scripts ---------------------------------------------------------------------


def annotation_api(ctx: AppContext) -> None:
    """Register ``/annotate_batch``, ``/annotate_submit`` and ``/annotate_skip`` (annotators and admins) and
    ``/annotate_progress`` (admins) in the current Blocks, beside the model queue."""
    from gradio import FileData, processing_utils
    from gradio.utils import get_upload_folder  # where every Blocks keeps the files it serves

    def served(ref: str) -> FileData:
        """A stored media file where gradio serves it (its cache), for the client to download."""
        return FileData(path=processing_utils.save_file_to_cache(ctx.store.media_path(ref), get_upload_folder()))

    def annotate_batch(campaign: str, n: int = 10, request: gr.Request = None) -> list[dict]:
        """Lease a batch of up to n items of a campaign to the caller (the items already held come first).
        Each item: output_id, task, instructions, inputs (the text inputs), suggestion (the model's output),
        input_media (the image or audio file) and output_media (generated images)."""
        annotator = require_annotator(ctx, request)
        queue = queue_of(ctx)
        found = queue.campaign(campaign)
        return [{"output_id": item.output_id, "task": item.task, "instructions": found.instructions,
                 "inputs": item.output.inputs, "suggestion": item.output.output, "model": item.output.model_id,
                 "lease_expires_at": item.lease_expires_at.isoformat(timespec="seconds"),
                 "input_media": [served(ref) for ref in item.output.input_media],
                 "output_media": [served(ref) for ref in item.output.output_media]}
                for item in queue.next_batch(campaign, annotator, batch_size(n))]

    def annotate_submit(campaign: str, output_id: str, thumbs: str | int | None = None,
                        correction: str | list[str] | dict | None = None, comment: str | None = None,
                        request: gr.Request = None) -> tuple[str, int]:
        """Save the caller's label on an item of their batch: thumbs ("up"/"down"), correction (as for
        /feedback), comment. Nothing given accepts the suggestion. Returns the message and the record id."""
        from .feedback import parse_correction, parse_thumbs

        annotator = require_annotator(ctx, request)
        if isinstance(correction, str) and correction.lstrip()[:1] in ("[", "{"):
            correction = parse_correction(ctx.store.get_output(output_id).task, correction)
        saved = queue_of(ctx).submit(campaign, output_id, annotator, thumbs=parse_thumbs(thumbs),
                                     correction=correction, comment=comment)
        return saved.message, saved.id

    def annotate_skip(campaign: str, output_id: str, request: gr.Request = None) -> str:
        """Give an item of the caller's batch back to the others (the caller never gets it again)."""
        queue_of(ctx).skip(campaign, output_id, require_annotator(ctx, request))
        return "Skipped."

    def annotate_progress(campaign: str, request: gr.Request = None) -> dict:
        """A campaign's progress: labels done and wanted, items complete, per annotator, agreement (admins)."""
        ctx.require_admin(request, "see the progress of every annotator")
        return json_safe(queue_of(ctx).progress(campaign).to_dict())

    def batch_validator(campaign: Any, n: Any = 10) -> list[dict[str, Any]]:
        try:
            batch_size(n)
        except MMDemoError as exc:
            return [gr.validate(True, ""), gr.validate(False, str(exc))]
        return [gr.validate(True, ""), gr.validate(True, "")]

    validators = {annotate_batch: batch_validator,
                  annotate_submit: feedback_validator(["campaign", "output_id", "thumbs", "correction", "comment"])}
    for fn in (annotate_batch, annotate_submit, annotate_skip, annotate_progress):
        options = dict(api_name=fn.__name__, concurrency_id=ANNOTATE_QUEUE, concurrency_limit=8)
        if fn in validators:
            validated_api(readable_errors(fn), validators[fn], **options)
        else:
            gr.api(readable_errors(fn), **options)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
