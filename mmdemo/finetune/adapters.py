"""One adapter per task: what fine-tuning needs to know about a task's models and data.

The training loop (``train.py``) and the job (``jobs.py``) are the same for every task; an adapter
says which model kinds it can train, which exported columns it reads, how to load a trainable model
and how to turn rows into a batch whose forward pass returns a loss. Adding zero-shot or speech
fine-tuning is one module with one adapter (a :class:`~.base.FinetuneAdapter`), listed in
:func:`finetune_adapters`.
"""

from __future__ import annotations

from .base import FinetuneAdapter
from .errors import UnsupportedBaseError


def finetune_adapters() -> dict[str, FinetuneAdapter]:
    """Every task that can be fine-tuned, with its adapter (``adapter.kinds``: the models it trains)."""
    from .caption import CaptionAdapter
    from .speech import SpeechAdapter
    from .vqa import VqaAdapter
    from .zero_shot import ZeroShotAdapter

    return {adapter.task: adapter for adapter in (CaptionAdapter(), VqaAdapter(), ZeroShotAdapter(), SpeechAdapter())}


def adapter_for(task: str) -> FinetuneAdapter:
    """The adapter of ``task``, or ``UnsupportedBaseError`` when the task cannot be fine-tuned yet."""
    adapters = finetune_adapters()
    try:
        return adapters[task]
    except KeyError:
        raise UnsupportedBaseError(
            f"Fine-tuning is not available for {task} yet; tasks: {', '.join(adapters)}."
        ) from None
