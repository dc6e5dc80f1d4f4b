"""One adapter per task: what fine-tuning needs to know about a task's models and data.

The training loop (``train.py``) and the job (``jobs.py``) are the same for every task; an adapter
says which model kinds it can train, which exported columns it reads, how to load a trainable model
and how to turn rows into a batch whose forward pass returns a loss. Adding a task's
fine-tuning is one module with one adapter, named by the task's descriptor (``TaskSpec.finetune``).
"""

from __future__ import annotations

from ..tasks.spec import resolve, task_specs
from .base import FinetuneAdapter
from .errors import UnsupportedBaseError


def finetune_adapters() -> dict[str, FinetuneAdapter]:
    """Every task that can be fine-tuned (its descriptor names an adapter), with its adapter
    (``adapter.kinds``: the models it trains)."""
    adapters = {}
    for spec in task_specs():
        if spec.finetune:
            adapter = resolve(spec.finetune)()
            if adapter.task != spec.id:
                raise TypeError(f"{spec.finetune} trains {adapter.task}, not {spec.id}.")
            adapters[spec.id] = adapter
    return adapters


def adapter_for(task: str) -> FinetuneAdapter:
    """The adapter of ``task``, or ``UnsupportedBaseError`` when the task cannot be fine-tuned yet."""
    adapters = finetune_adapters()
    try:
        return adapters[task]
    except KeyError:
        raise UnsupportedBaseError(
            f"Fine-tuning is not available for {task} yet; tasks: {', '.join(adapters)}."
        ) from None
