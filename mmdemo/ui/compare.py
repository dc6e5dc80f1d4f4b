"""Compare mode, under every tab: one request run on two models, shown blind as A and B, then a vote.

:func:`compare_mode` is built by :func:`~mmdemo.ui.events.connect` from the tab's own endpoint (its ``request``,
inputs, ``present`` and output components), so every task gets it the same way. The tab's model is the first
model, a second dropdown picks the other; both run with the same inputs, settings and seed
(:func:`mmdemo.tasks.compare`), both results are recorded, and the server draws which one is shown as A
(stored with the comparison: a client never chooses the sides). After the vote (A better, B better, tie,
both bad) the names are revealed.

API: ``/<task endpoint>_compare`` (the task's inputs with ``model_a`` and ``model_b`` for ``model`` -> the
compare id, then A's and B's outputs) and ``/vote`` (compare id, choice -> the revealed names). The store is
imported on first use (it costs start-up time); nothing here imports torch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import gradio as gr

from .. import tasks
from ..application import App as AppContext
from ..errors import MMDemoError
from .messages import answered_in, blamed_input, readable_errors, validated_api, validation_results
from .widgets import default_model, model_picker

VOTE_QUEUE = "vote"  # /vote: quick database writes beside the model queue, never behind it
SIDES = ("A", "B")
VOTES = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both bad"))
INTRO = ("Run the inputs above on two models at once, with the same settings and seed. The answers are shown "
         "as **A** and **B** in random order; vote for the better one and the names are revealed. Votes make "
         "the leaderboard (Models tab) and preference data for training.")


@dataclass
class CompareTarget:
    """What a tab's endpoint is made of (as :func:`~mmdemo.ui.events.connect` receives it)."""

    task: str
    request: Callable[..., tuple[str | None, dict[str, Any]]]
    inputs: Sequence[gr.components.Component]
    present: Callable[[dict[str, Any]], tuple[Any, ...]]
    outputs: Sequence[gr.components.Component]
    api_name: str
    model: gr.Dropdown
    media: str | None
    text: str

    @property
    def names(self) -> list[str]:
        """The compare endpoint's parameters: the task's, ``model`` replaced by ``model_a`` and ``model_b``."""
        names = list(inspect.signature(self.request).parameters)
        at = names.index("model")
        return [*names[:at], "model_a", "model_b", *names[at + 1:]]

    def unpack(self, values: Sequence[Any]) -> tuple[Any, Any, dict[str, Any]]:
        """(model_a, model_b, the task inputs) from the compare endpoint's values."""
        values = list(values)
        at = self.names.index("model_b")
        model_b = values.pop(at)
        model_a, inputs = self.request(*values)
        return model_a, model_b, inputs


def clone(component: gr.components.Component, side: str) -> gr.components.Component:
    """A new component like ``component`` (the tab's own output), labelled for ``side``."""
    args = {k: v for k, v in component.constructor_args.items() if k not in ("elem_id", "key", "render")}
    args["label"] = f"{args['label']} ({side})" if args.get("label") else side
    return type(component)(**args)


def comparison_validator(ctx: AppContext, target: CompareTarget) -> Callable[..., list[dict[str, Any]]]:
    """Checks a comparison before it joins the queue, as the task's endpoint checks a request, plus the two
    models (of this task, not the same one); the message goes on the input concerned."""
    names = target.names

    def refuse(blamed: str, message: str) -> list[dict[str, Any]]:
        return [gr.validate(name != blamed, message if name == blamed else "") for name in names]

    def validate(*values: Any) -> list[dict[str, Any]]:
        try:
            model_a, model_b, inputs = target.unpack(values)
        except MMDemoError as exc:
            return refuse(blamed_input(exc, target.media, target.text, names), str(exc))
        for name, model_id in (("model_a", model_a), ("model_b", model_b)):
            try:
                if model_id:
                    ctx.registry.catalog.get(model_id, tasks.task_spec(target.task).id)
            except MMDemoError as exc:
                return refuse(name, str(exc))
        try:
            tasks.prepare_comparison(ctx.registry, target.task, model_a, model_b, inputs)
        except MMDemoError as exc:
            blamed = blamed_input(exc, target.media, target.text, names)
            return refuse("model_a" if blamed == "model" else blamed, str(exc))
        return [gr.validate(True, "") for _ in names]

    return validate


def run_comparison(ctx: AppContext, target: CompareTarget, values: Sequence[Any], caller: gr.Request | None) -> Any:
    """Run both models, record both results and the comparison; the stored comparison and the two task results
    in the order shown (A, B)."""
    from ..feedback import StoreError
    from ..feedback.comparisons import ComparisonStore

    model_a, model_b, inputs = target.unpack(values)
    first, second = tasks.compare(ctx.registry, target.task, model_a, model_b, inputs, record=ctx.recorder_for(caller))
    if first.output_id is None or second.output_id is None:
        raise StoreError("The answers could not be recorded, so they cannot be compared (the server log says why).")
    for prediction in (first, second):
        ctx.recorder.wait(prediction.output_id)  # a comparison refers to both recorded outputs
    comparison = ComparisonStore(ctx.store).create(first.task, first.output_id, second.output_id,
                                                   created_by=ctx.annotator_of(caller))
    shown = (second, first) if comparison.swapped else (first, second)
    return comparison, [prediction.result for prediction in shown]


def cast_vote(ctx: AppContext, request: gr.Request | None, compare_id: Any, choice: Any) -> Any:
    """Save the caller's vote on a comparison (a second vote replaces the first); the comparison, revealed."""
    from ..feedback.comparisons import ComparisonStore

    comparison = ComparisonStore(ctx.store).vote(compare_id, ctx.annotator_of(request), choice)
    ctx.ops.metrics.recorded("feedback")
    return comparison


def revealed_line(comparison: Any) -> str:
    labels = dict(VOTES)
    return (f"**Your vote: {labels[comparison.choice]}.** A was **{comparison.model_a}**, B was "
            f"**{comparison.model_b}**. You can change your vote.")


def compare_mode(ctx: AppContext, target: CompareTarget, *, queue: dict[str, Any],
                 wrap: Callable[[Callable], Callable] = lambda fn: fn) -> SimpleNamespace:
    """The Compare accordion of a tab and its ``/<api_name>_compare`` endpoint (in ``queue``: the model queue).
    ``wrap`` is applied to the handler (the tab's request-id logging)."""
    quick = dict(queue=False, show_progress="hidden", api_visibility="private")
    with gr.Accordion("Compare two models (blind vote)", open=False, elem_classes="mmdemo-compare") as accordion:
        gr.Markdown(INTRO, elem_classes="mmdemo-note")
        with gr.Row():
            def other_model() -> str | None:
                """On page load: the first model of the task other than its default (the tab's model A)."""
                task = tasks.task_spec(target.task).id
                first = default_model(ctx, task)
                return next((spec.id for spec in ctx.registry.catalog.for_task(task) if spec.id != first), first)

            model_b, note_b = model_picker(ctx, target.task, label="Second model", selected=other_model)
            button = gr.Button("Compare", variant="primary", elem_classes="mmdemo-compare-button")
        compare_id = gr.Textbox(label="Comparison id", interactive=False, visible=False)
        sides, names = [], []
        with gr.Row(equal_height=False):
            for side in SIDES:
                with gr.Column():
                    gr.Markdown(f"### {side}")
                    sides.append([clone(component, side) for component in target.outputs])
                    names.append(gr.Markdown(elem_classes=f"mmdemo-compare-name-{side.lower()}"))
        with gr.Row(visible=False) as voting:
            buttons = {choice: gr.Button(label, size="sm", elem_classes=f"mmdemo-vote-{choice}")
                       for choice, label in VOTES}
        revealed = gr.Markdown(elem_classes="mmdemo-compare-revealed")

    names_ = target.names
    count = len(target.outputs)

    def compare(*values: Any) -> tuple[Any, ...]:
        *values, caller = values
        comparison, results = run_comparison(ctx, target, values, caller)
        shown = []
        for side, result in zip(SIDES, results):  # the model's name stays hidden until the vote
            shown += list(target.present({**result, "model": {**result.get("model", {}), "id": f"model-{side}"}}))
        return (comparison.id, *shown)

    compare.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names_]
        + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])
    compare.__annotations__ = {"request": gr.Request}
    compare.__name__ = compare.__qualname__ = f"{target.api_name}_compare"
    inputs = list(target.inputs)
    at = names_.index("model_b")
    inputs.insert(at, model_b)
    outputs = [compare_id, *sides[0], *sides[1]]
    event = button.click(readable_errors(wrap(compare)), inputs, outputs, api_name=f"{target.api_name}_compare",
                         validator=comparison_validator(ctx, target), preprocess=False,
                         show_progress_on=[sides[0][0], sides[1][0]], **queue)
    event.success(lambda: (gr.Row(visible=True), "", "", ""), None, [voting, revealed, *names], **quick)
    event.failure(lambda: (gr.Row(visible=False), None, *([None] * (2 * count))), None,
                  [voting, compare_id, *sides[0], *sides[1]], **quick)

    def vote_with(choice: str) -> Callable[..., Any]:
        def vote_in_tab(compare_id: str, request: gr.Request) -> tuple[str, str, str]:  # not "vote": /vote is the API's
            comparison = cast_vote(ctx, request, compare_id, choice)
            return revealed_line(comparison), f"**{comparison.model_a}**", f"**{comparison.model_b}**"
        return vote_in_tab

    for choice, vote_button in buttons.items():
        vote_button.click(answered_in(revealed, "Vote not saved")(vote_with(choice)), [compare_id],
                          [revealed, *names], concurrency_id=VOTE_QUEUE, api_visibility="private",
                          show_progress="hidden")
    return SimpleNamespace(accordion=accordion, model_b=model_b, note_b=note_b, button=button, compare_id=compare_id,
                           sides=sides, names=names, voting=voting, votes=buttons, revealed=revealed, event=event)


def vote_validator(ctx: AppContext) -> Callable[[Any, Any], list[dict[str, Any]]]:
    """``/vote``'s checks before queueing: a known comparison, a choice among A / B / tie / both bad."""

    def validate(compare_id: Any, choice: Any) -> list[dict[str, Any]]:
        from ..feedback.comparisons import ComparisonStore, check_choice

        return validation_results([lambda: ComparisonStore(ctx.store).get(compare_id), lambda: check_choice(choice)])

    return validate


def vote_api(ctx: AppContext) -> None:
    """Register ``/vote`` in the current Blocks."""

    def vote(compare_id: str, choice: str, request: gr.Request = None) -> dict[str, Any]:
        """Vote on a comparison. compare_id: from a /..._compare call. choice: "a" (A is better), "b", "tie" or
        "both_bad". Returns the revealed names ({"A": model, "B": model, "winner", "choice", "compare_id"});
        voting again (same login or session) changes the vote."""
        return cast_vote(ctx, request, compare_id, choice).revealed()

    validated_api(readable_errors(vote), vote_validator(ctx), api_name="vote", concurrency_id=VOTE_QUEUE,
                  concurrency_limit=16)


__all__ = ["CompareTarget", "cast_vote", "clone", "compare_mode", "vote_api"]
