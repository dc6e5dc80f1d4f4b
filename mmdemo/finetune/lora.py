"""LoRA training with peft (job processes only: the web server never imports this module or peft).

:func:`add_lora` wraps the loaded model after the task adapter fitted it: only the LoRA matrices (and the
modules the task trains whole, e.g. ViLT's answer head) train. The job saves the adapter at the best
epoch (:func:`save_adapter`: peft's files, the processor and, beside a labelled head, the model's labels)
and, with ``--merge``, :func:`merge_saved` folds the saved best adapter into a full checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..lora import PEFT_WEIGHTS_FILE
from .base import FinetuneAdapter
from .config import FinetuneConfig


class InvalidLoraTargetsError(InvalidInputError):
    """The LoRA target modules asked for are not in the base model."""


def lora_targets(adapter: FinetuneAdapter, kind: str, config: FinetuneConfig) -> tuple[str, ...]:
    """The module names to adapt: the config's, else the task adapter's default for ``kind``."""
    targets = config.lora_targets or adapter.lora_targets.get(kind)
    if not targets:
        raise InvalidLoraTargetsError(f"No default LoRA target modules for {adapter.task} models of kind {kind}: "
                                      "name them (--lora-targets a,b).")
    return tuple(targets)


def add_lora(model: Any, adapter: FinetuneAdapter, kind: str, config: FinetuneConfig) -> Any:
    """``model`` wrapped by peft with the config's LoRA (rank, alpha, targets); only LoRA weights train."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(adapter, kind, config)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        leaves = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                         if type(module).__name__ in ("Linear", "Conv2d") and name})
        raise InvalidLoraTargetsError(
            f"LoRA target module(s) {', '.join(missing)} are not in '{config.base}'. Its Linear layers are "
            f"named: {', '.join(leaves[:30])}.")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules=list(targets), lora_dropout=0.0,
                      modules_to_save=list(adapter.lora_modules_to_save.get(kind, ())) or None)
    torch.manual_seed(config.seed)  # the LoRA matrices' initial values: the same run gives the same adapter
    return get_peft_model(model, lora)


def adapter_params_m(model: Any) -> float:
    """Millions of parameters the adapter saves (the trainable ones)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def save_adapter(model: Any, processor: Any, adapter: FinetuneAdapter, folder: Path) -> None:
    """peft's adapter files and the processor (the task adapter's ``save``); beside a head trained whole,
    the model's config too, for its labels (``id2label``)."""
    adapter.save(model, processor, folder)
    if model.peft_config["default"].modules_to_save:
        model.get_base_model().config.save_pretrained(folder)
    (Path(folder) / "README.md").unlink(missing_ok=True)  # peft's model card template


def merge_saved(model: Any, processor: Any, adapter: FinetuneAdapter, folder: Path) -> Any:
    """The best epoch's adapter (saved in ``folder``) merged into the model, written there as a full
    checkpoint in place of the adapter. Returns the merged model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(folder) / PEFT_WEIGHTS_FILE)))
    merged = model.merge_and_unload()
    for path in Path(folder).iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    adapter.save(merged, processor, folder)
    return merged

