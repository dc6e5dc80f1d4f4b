"""One place per task: the :class:`TaskSpec` descriptor and the registry of tasks.

A task module describes everything about its task in one ``TaskSpec`` and registers it where it is
defined (``register_task(TaskSpec(...))``); the catalog, the CLI, the tabs, Annotate, export and
fine-tuning iterate :func:`task_specs` and look tasks up with :func:`task_spec`. Nothing else lists
the tasks. Built-in tasks are found like any other: every module of the ``mmdemo.tasks`` package is
imported on the first lookup, then the modules named by the ``mmdemo.tasks`` entry-point group of
installed packages (a plugin's own tasks)::

    register_task(TaskSpec(
        id="image-to-text", title="Caption", aliases=("caption",), input_kind="image",
        runner=CaptionTask(), schema=CaptionSchema(), kinds={"blip": "transformers"},
        models=(ModelSpec("blip-caption-base", "image-to-text", "blip", "hf-hub:..."),),
        tiny_models=(...), tiny_builders={"blip-caption": TinyBuilder(build_blip_caption)},
        tab="mmdemo.ui.caption", finetune="mmdemo.finetune.caption:CaptionAdapter",
    ))

Parts that live in higher layers (the tab, the fine-tuning adapter) are named, not imported, so that a
task module imports neither gradio, the store nor the training code.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import UnknownTaskError

if TYPE_CHECKING:
    from ..catalog import ModelSpec
    from ..tiny import TinyBuilder
    from .base import Task
    from .schema import TaskSchema

log = logging.getLogger(__name__)

INPUT_KINDS = ("image", "audio", "text")
ENTRY_POINT_GROUP = "mmdemo.tasks"


@dataclass(frozen=True)
class TaskSpec:
    """Everything about one task.

    ``id`` is the Hub's task tag; ``aliases`` are short names (for the CLI and the API); ``input_kind`` says
    what the request's media is (``image``, ``audio``, or ``text`` for none); ``kinds`` maps each model kind the task serves to its backend (``transformers``, ``diffusers``,
    ``ctranslate2``); ``models`` and ``tiny_models`` are its built-in catalog entries (the first is the
    default) and ``tiny_builders`` make the tiny checkpoints those name. ``tab`` is the module of its UI tab,
    ``finetune`` the ``module:Class`` of its fine-tuning adapter (None: not trainable yet).
    """

    id: str
    title: str
    runner: "Task"
    schema: "TaskSchema"
    kinds: Mapping[str, str]
    aliases: tuple[str, ...] = ()
    api_name: str = ""  # the API endpoint (``/caption``); default: the first alias in snake case
    input_kind: str = "image"
    description: str = ""
    models: tuple["ModelSpec", ...] = ()
    tiny_models: tuple["ModelSpec", ...] = ()
    tiny_builders: Mapping[str, "TinyBuilder"] = field(default_factory=dict)
    tab: str | None = None
    finetune: str | None = None
    order: int = 100  # tabs and listings sort by it, then by registration

    def __post_init__(self) -> None:
        if not self.api_name:
            object.__setattr__(self, "api_name", (self.aliases[0] if self.aliases else self.id).replace("-", "_"))
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"Task {self.id}: input_kind must be one of {INPUT_KINDS}, not {self.input_kind!r}.")
        if self.runner.task != self.id or self.schema.task != self.id:
            raise ValueError(f"Task {self.id}: its runner and schema must be for {self.id}.")
        for model in (*self.models, *self.tiny_models):
            if model.task != self.id or model.kind not in self.kinds:
                raise ValueError(f"Task {self.id}: built-in model {model.id} is for {model.task}/{model.kind}.")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


_TASKS: dict[str, TaskSpec] = {}
_NAMES: dict[str, str] = {}  # id or alias -> id
_discovered = False
_discovery_lock = threading.RLock()


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the registry; a task id or alias that is already taken is refused."""
    with _discovery_lock:
        taken = [name for name in spec.names if name in _NAMES]
        if taken:
            raise ValueError(f"Task {spec.id}: the name(s) {', '.join(taken)} are already registered "
                             f"(by {', '.join(sorted({_NAMES[n] for n in taken}))}).")
        _TASKS[spec.id] = spec
        for name in spec.names:
            _NAMES[name] = spec.id
    return spec


def unregister_task(task_id: str) -> None:
    """Remove a task (tests and plugins replacing a task)."""
    with _discovery_lock:
        spec = _TASKS.pop(task_id)
        for name in spec.names:
            _NAMES.pop(name, None)


def task_specs() -> tuple[TaskSpec, ...]:
    """Every registered task, in tab order."""
    _discover()
    specs = list(_TASKS.values())
    return tuple(sorted(specs, key=lambda s: (s.order, specs.index(s))))


def task_ids() -> tuple[str, ...]:
    return tuple(spec.id for spec in task_specs())


def task_spec(name: Any) -> TaskSpec:
    """The task with id or alias ``name``, or :class:`UnknownTaskError` listing the tasks."""
    _discover()
    task_id = _NAMES.get(name) if isinstance(name, str) else None
    if task_id is None:
        raise UnknownTaskError(f"Unknown task {name!r}. Tasks: {', '.join(task_ids())}.")
    return _TASKS[task_id]


def _discover() -> None:
    """Import the task modules once: this package's, then those of installed plugins."""
    global _discovered
    if _discovered:
        return
    with _discovery_lock:
        if _discovered:
            return
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__package__}.{module.name}")
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception:  # a broken plugin must not take the built-in tasks down
                log.exception("task plugin %s could not be loaded", entry.name)
        _discovered = True


def resolve(reference: str) -> Any:
    """The object a ``"module:attribute"`` (or plain module) reference of a spec names."""
    module, _, attribute = reference.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded
