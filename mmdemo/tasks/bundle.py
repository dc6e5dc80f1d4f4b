"""What a loaded transformers model looks like to the tasks: the model, its processor, its placement."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..placement import Placement


@dataclass
class TransformersBundle:
    model: Any
    processor: Any
    placement: Placement
    processor_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inputs(self, **processor_arguments: Any) -> Any:
        """The processor's tensors for the model, on its device and in its dtype (see :func:`move_inputs`).

        The processor runs one call at a time (the model does not): a fast tokenizer keeps its padding and
        truncation settings between calls, and changing them while another thread encodes fails ("Already
        borrowed") or encodes that thread's text with the other settings.
        """
        with self.processor_lock:
            batch = self.processor(**processor_arguments, return_tensors="pt")
        return move_inputs(batch, self)


def move_inputs(batch: Any, bundle: TransformersBundle) -> Any:
    """Put processor outputs on the model's device; floating tensors take the model's dtype."""
    import torch

    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(bundle.placement.device)
            if value.is_floating_point():
                value = value.to(bundle.placement.torch_dtype)
        moved[key] = value
    return moved


def generation_settings(max_new_tokens: int, num_beams: int, do_sample: bool, temperature: float,
                        top_p: float) -> dict[str, Any]:
    """``generate`` keyword arguments for greedy, beam or sampled decoding."""
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": do_sample}
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p)
    return settings
