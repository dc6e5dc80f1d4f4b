"""The training loop every task shares: AdamW, gradient clipping, a validation pass after each
epoch, and the best epoch kept. Plain torch; the task adapter makes the batches and the loss."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..placement import Placement
from .adapters import FinetuneAdapter
from .config import FinetuneConfig
from .data import TrainingData
from .errors import FinetuneCancelled, FinetuneError


@dataclass
class Progress:
    """Where a job is, for a progress bar or a log line."""

    stage: str                        # preparing, training, validated (an epoch ended), saving, done
    epoch: int = 0                    # 1-based epoch being trained (0 before training)
    epochs: int = 0
    step: int = 0                     # optimizer steps done
    total_steps: int = 0
    train_loss: float | None = None   # running mean over the current epoch
    val_loss: float | None = None     # the latest validation loss

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0


def training_dtype(placement: Placement) -> str:
    """The weights train in float32; on a CUDA GPU the forward pass autocasts to the registry's dtype."""
    return placement.dtype if placement.device.startswith("cuda") else "float32"


def steps_per_epoch(config: FinetuneConfig, train_rows: int) -> int:
    return math.ceil(train_rows / config.batch_size)


def total_steps(config: FinetuneConfig, train_rows: int) -> int:
    total = steps_per_epoch(config, train_rows) * config.epochs
    return min(total, config.max_steps) if config.max_steps else total


def evaluate(model: Any, processor: Any, adapter: FinetuneAdapter, dataset: Any, *, batch_size: int,
             max_length: int, placement: Placement) -> float | None:
    """Mean loss per example over ``dataset`` (None when it has no rows); the model is left in eval mode."""
    import torch

    if dataset.num_rows == 0:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode(), _autocast(placement):
        for start in range(0, dataset.num_rows, batch_size):
            rows = dataset[start:start + batch_size]
            batch = _to_device(adapter.collate(model, processor, rows, max_length), placement.device)
            size = len(next(iter(rows.values())))
            total += float(adapter.loss(model, batch)) * size
            count += size
    return total / count


def train(
    model: Any,
    processor: Any,
    adapter: FinetuneAdapter,
    data: TrainingData,
    config: FinetuneConfig,
    placement: Placement,
    *,
    save_best: Callable[[int], None],
    report: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Train ``model`` in place; call ``save_best(epoch)`` whenever an epoch beats the best validation
    loss so far (every epoch when there is no validation split). Deterministic for a given seed on CPU.

    Returns the metrics: the losses before training (``initial``), per epoch (``epochs``: mean
    training loss over its steps, validation loss after it), the ``best_epoch`` and how it was chosen.
    Raises :class:`FinetuneCancelled` as soon as ``should_stop()`` says so (checked every step).
    """
    import torch

    started = time.perf_counter()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scaler = torch.amp.GradScaler("cuda") if training_dtype(placement) == "float16" else None
    evaluate_split = lambda split: evaluate(model, processor, adapter, split, batch_size=config.batch_size,  # noqa: E731
                                            max_length=config.max_length, placement=placement)
    total = total_steps(config, data.train.num_rows)
    progress = Progress("training", epochs=config.epochs, total_steps=total)
    metrics: dict[str, Any] = {
        "initial": {"train_loss": evaluate_split(data.train), "val_loss": evaluate_split(data.validation)},
        "epochs": [],
        "selected_by": "validation loss" if data.validation.num_rows else "last epoch (no validation rows)",
    }
    progress.val_loss = metrics["initial"]["val_loss"]
    report(replace(progress))
    best = math.inf
    step = 0
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        progress.epoch = epoch
        losses: list[float] = []
        permutation = torch.randperm(data.train.num_rows, generator=order).tolist()
        for start in range(0, len(permutation), config.batch_size):
            if should_stop():
                raise FinetuneCancelled(f"Fine-tuning '{config.name}' was cancelled at step {step}.")
            # 1. the batch: rows in this epoch's shuffled order, collated by the task adapter
            rows = data.train[permutation[start:start + config.batch_size]]
            batch = _to_device(adapter.collate(model, processor, rows, config.max_length), placement.device)
            # 2. forward and backward (autocast on a GPU; the loss scaled for float16)
            with _autocast(placement):
                loss = adapter.loss(model, batch)
            if not torch.isfinite(loss):
                raise FinetuneError(f"The loss became {float(loss)} at step {step + 1}; try a lower learning rate.")
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            # 3. clip the gradient norm, then step
            if scaler:
                scaler.unscale_(optimizer)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            # 4. bookkeeping and progress
            step += 1
            losses.append(loss.item())
            progress.step, progress.train_loss = step, sum(losses) / len(losses)
            report(replace(progress))
            if step >= total:
                break
        # 5. validation; the best epoch so far is saved
        val_loss = evaluate_split(data.validation)
        progress.val_loss = val_loss
        score = val_loss if val_loss is not None else -epoch  # no validation: the latest epoch wins
        improved = score < best
        if improved:
            best = score
            metrics["best_epoch"] = epoch
            save_best(epoch)
        metrics["epochs"].append({"epoch": epoch, "steps": len(losses), "train_loss": progress.train_loss,
                                  "val_loss": val_loss, "best": improved,
                                  "seconds": round(time.perf_counter() - epoch_started, 3)})
        progress.stage = "validated"
        report(replace(progress))
        progress.stage = "training"
        if step >= total:
            break
    metrics["steps"] = step
    metrics["best_val_loss"] = None if best == math.inf or data.validation.num_rows == 0 else best
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    return metrics


def _autocast(placement: Placement) -> Any:
    import torch

    dtype = training_dtype(placement)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
