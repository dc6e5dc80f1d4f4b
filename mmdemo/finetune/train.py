"""The training loop every task shares: AdamW, gradient clipping, a validation pass after each
epoch, and the best epoch kept; the task adapter makes the batches and the loss.

An ``accelerate.Accelerator`` owns device placement, mixed precision (bf16/fp16 autocast on CUDA, none
on CPU) and the processes: under ``accelerate launch`` (or ``torchrun``) each process trains on its share
of every epoch, validation losses are summed over all of them, and only the main process saves. The loop
hands resumable checkpoints (:class:`TrainingState`) to the job every ``checkpoint_every`` steps and at
each epoch's end, and continues from one exactly as the uninterrupted run would have."""

from __future__ import annotations

import contextlib
import math
import os
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


def process_share() -> tuple[int, int]:
    """(this process's rank, the number of processes), as ``accelerate launch`` and ``torchrun`` set them
    (0, 1 in a plain process); read from the environment, so asking imports nothing."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return process_share()[0] == 0


def wait_for_everyone() -> None:
    """A barrier across the job's processes (nothing to wait for in a single process)."""
    if process_share()[1] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def rows_per_process(train_rows: int, processes: int = 1) -> int:
    """Each process's share of an epoch: the rows dealt out in turn, the first ones again to even it out."""
    return math.ceil(train_rows / processes)


def steps_per_epoch(config: FinetuneConfig, train_rows: int, processes: int = 1) -> int:
    batches = math.ceil(rows_per_process(train_rows, processes) / config.batch_size)
    return math.ceil(batches / config.grad_accum)


def total_steps(config: FinetuneConfig, train_rows: int, processes: int = 1) -> int:
    total = steps_per_epoch(config, train_rows, processes) * config.epochs
    return min(total, config.max_steps) if config.max_steps else total


@dataclass
class TrainingState:
    """All a run needs to continue exactly where it was: written by the job (``torch.save``) every
    ``checkpoint_every`` optimizer steps and at each epoch's end, passed back to :func:`train` to resume."""

    model: dict[str, Any]              # the weights (state_dict)
    optimizer: dict[str, Any]
    rng: dict[str, Any]                # python, torch, the shuffling and the augmentation generators
    epoch: int                         # the epoch under way (1-based), or just finished when epoch_done
    epoch_done: bool
    order: list[int]                   # the epoch's rows in their shuffled order (each process takes its share)
    position: int                      # how many of this process's share were trained on
    step: int                          # optimizer steps done
    losses: list[float]                # the epoch's training losses so far
    rows_seen: int                     # training rows this process trained on since the start
    best: float                        # the best epoch's score (validation loss; -epoch without validation)
    metrics: dict[str, Any]            # initial losses, the epochs done, best_epoch
    fingerprint: str | None = None     # the training data's (filled in by the job)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate(model: Any, processor: Any, adapter: FinetuneAdapter, dataset: Any, *, batch_size: int,
             max_length: int, placement: Placement, accelerator: Any = None) -> float | None:
    """Mean loss per example over ``dataset`` (None when it has no rows); the model is left in eval mode.
    With an ``accelerator`` of several processes, each scores its share and the sums are gathered."""
    import torch

    if dataset.num_rows == 0:
        return None
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if processes > 1:
        dataset = dataset.select(range(rank, dataset.num_rows, processes))
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode(), _autocast(placement):
        for start in range(0, dataset.num_rows, batch_size):
            rows = dataset[start:start + batch_size]
            batch = _to_device(adapter.collate(model, processor, rows, max_length), placement.device)
            size = len(next(iter(rows.values())))
            total += float(adapter.loss(model, batch)) * size
            count += size
    if processes > 1:
        summed = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=accelerator.device),
                                    reduction="sum")
        total, count = float(summed[0]), int(summed[1])
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
    checkpoint: Callable[[TrainingState], None] | None = None,
    resume_from: TrainingState | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; call ``save_best(epoch)`` whenever an epoch beats the best validation
    loss so far (every epoch when there is no validation split). Deterministic for a given seed on CPU.

    Returns the metrics: the losses before training (``initial``), per epoch (``epochs``: mean
    training loss over its steps, validation loss after it), the ``best_epoch`` and how it was chosen,
    and the ``processes`` (``world_size``, and ``train_rows_seen`` by each, in rank order).
    Raises :class:`FinetuneCancelled` as soon as ``should_stop()`` says so (checked every step).
    ``checkpoint(state)`` is called every ``config.checkpoint_every`` optimizer steps and at each epoch's
    end (on the main process only, as ``save_best``); ``resume_from``: such a state to continue from.
    """
    import torch

    started = time.perf_counter()
    accelerator = _accelerator(placement)
    main, processes = accelerator.is_main_process, accelerator.num_processes
    placement = replace(placement, device=str(accelerator.device))
    if processes > 1 and len(set(_gathered(accelerator, _digest(data.fingerprint)))) > 1:
        raise FinetuneError("The job's processes read different training data (the feedback changed while each "
                            "exported it); start the job again.")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    augmenting = torch.Generator().manual_seed(config.seed + 1)  # its own draws: without augment, as before
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    if resume_from is not None:
        model.load_state_dict(resume_from.model)
        optimizer.load_state_dict(resume_from.optimizer)
    trained, optimizer = accelerator.prepare(model, optimizer)  # trained: model, or its DDP wrapper
    evaluate_split = lambda split: evaluate(model, processor, adapter, split, batch_size=config.batch_size,  # noqa: E731
                                            max_length=config.max_length, placement=placement,
                                            accelerator=accelerator)
    total = total_steps(config, data.train.num_rows, processes)
    progress = Progress("training", epochs=config.epochs, total_steps=total)
    if resume_from is None:
        metrics: dict[str, Any] = {
            "initial": {"train_loss": evaluate_split(data.train), "val_loss": evaluate_split(data.validation)},
            "epochs": [],
            "selected_by": "validation loss" if data.validation.num_rows else "last epoch (no validation rows)",
        }
        state = TrainingState({}, {}, {}, epoch=0, epoch_done=True, order=[], position=0, step=0, losses=[],
                              rows_seen=0, best=math.inf, metrics=metrics)
        progress.val_loss = metrics["initial"]["val_loss"]
    else:
        state, metrics = resume_from, resume_from.metrics
        _set_rng(resume_from.rng, order, augmenting)
        progress.epoch, progress.step = state.epoch, state.step
        progress.train_loss = sum(state.losses) / len(state.losses) if state.losses else None
        progress.val_loss = metrics["epochs"][-1]["val_loss"] if metrics["epochs"] else metrics["initial"]["val_loss"]
    report(replace(progress))

    def save_state(epoch_done: bool) -> None:
        if checkpoint is not None and main:
            state.model, state.optimizer = accelerator.unwrap_model(trained).state_dict(), optimizer.state_dict()
            state.rng, state.epoch_done = _get_rng(order, augmenting), epoch_done
            checkpoint(state)

    first_epoch = state.epoch + 1 if state.epoch_done else state.epoch
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        progress.epoch = epoch
        if state.epoch != epoch or state.epoch_done:  # a new epoch (not one resumed midway)
            permutation = torch.randperm(data.train.num_rows, generator=order).tolist()
            state.epoch, state.epoch_done, state.position, state.losses = epoch, False, 0, []
            state.order = permutation
        share = _share(state.order, accelerator.process_index, processes)
        while state.position < len(share) and state.step < total:
            if should_stop():
                raise FinetuneCancelled(f"Fine-tuning '{config.name}' was cancelled at step {state.step}.")
            # 1. the step's batches: rows in this epoch's shuffled order (this process's share), augmented
            #    if asked, collated by the task adapter; grad_accum of them add up into one optimizer step
            batches = []
            for _ in range(config.grad_accum):
                if state.position >= len(share):
                    break
                rows = data.train[share[state.position:state.position + config.batch_size]]
                state.position += len(next(iter(rows.values())))
                if config.augment:
                    rows = adapter.augment(rows, config.augment, augmenting)
                batch = adapter.collate(model, processor, rows, config.max_length)
                if config.augment:
                    batch = adapter.augment_batch(batch, config.augment, augmenting)
                batches.append((_to_device(batch, placement.device), len(next(iter(rows.values())))))
            # 2. forward and backward under the accelerator's autocast (bf16/fp16 on a GPU, loss scaled for
            #    fp16), each batch weighing its share of the step; processes sync at the step's last one
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for number, (batch, size) in enumerate(batches, 1):
                syncing = number == len(batches)
                with (contextlib.nullcontext() if syncing else accelerator.no_sync(trained)), accelerator.autocast():
                    loss = adapter.loss(trained, batch)
                    if not torch.isfinite(loss):
                        raise FinetuneError(f"The loss became {float(loss)} at step {state.step + 1}; "
                                            "try a lower learning rate.")
                    accelerator.backward(loss / len(batches))
                loss_sum += loss.item()
                state.rows_seen += size
            # 3. clip the gradient norm, then step
            if config.grad_clip:
                accelerator.clip_grad_norm_(trained.parameters(), config.grad_clip)
            optimizer.step()
            # 4. bookkeeping, progress and a checkpoint now and then
            state.step += 1
            state.losses.append(loss_sum / len(batches))
            progress.step, progress.train_loss = state.step, sum(state.losses) / len(state.losses)
            report(replace(progress))
            if state.step % config.checkpoint_every == 0 and state.step < total:
                save_state(epoch_done=False)
        # 5. validation; the best epoch so far is saved (by the main process, the others waiting)
        val_loss = evaluate_split(data.validation)
        progress.val_loss = val_loss
        score = val_loss if val_loss is not None else -epoch  # no validation: the latest epoch wins
        improved = score < state.best
        if improved:
            state.best = score
            metrics["best_epoch"] = epoch
            if main:
                save_best(epoch)
            accelerator.wait_for_everyone()
        train_loss = _mean_over_processes(accelerator, progress.train_loss)
        metrics["epochs"].append({"epoch": epoch, "steps": len(state.losses), "train_loss": train_loss,
                                  "val_loss": val_loss, "best": improved,
                                  "seconds": round(time.perf_counter() - epoch_started, 3)})
        save_state(epoch_done=True)
        progress.stage = "validated"
        report(replace(progress))
        progress.stage = "training"
        if state.step >= total:
            break
    metrics["steps"] = state.step
    metrics["best_val_loss"] = None if state.best == math.inf or data.validation.num_rows == 0 else state.best
    metrics["processes"] = {"world_size": processes, "train_rows_seen": _gathered(accelerator, state.rows_seen)}
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    return metrics


def _accelerator(placement: Placement) -> Any:
    """The run's accelerator: CPU unless the placement is CUDA (then the registry's dtype as autocast);
    under ``accelerate launch`` / ``torchrun`` it joins the other processes (gloo on CPU)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = placement.device.startswith("cuda")
    if process_share()[1] == 1:
        # accelerate keeps its settings process-wide and refuses others: a job in a process that ran another
        # (tests, a notebook) may train on another device or in another precision
        AcceleratorState._reset_state(reset_partial_state=True)
        if cuda and ":" in placement.device:
            torch.cuda.set_device(placement.device)  # the registry's GPU, not the first one
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(training_dtype(placement), "no")
    # Some adapters leave parts of a model out of the loss (e.g. BLIP VQA's unused heads): DDP must know.
    return Accelerator(cpu=not cuda, mixed_precision=precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _share(permutation: list[int], rank: int, processes: int) -> list[int]:
    """Process ``rank``'s rows of an epoch: every ``processes``-th row of the shuffled order, the first
    rows dealt again so that every process gets as many (DistributedSampler's rule)."""
    if processes == 1:
        return permutation
    padded = permutation + permutation[:rows_per_process(len(permutation), processes) * processes - len(permutation)]
    return padded[rank::processes]


def _gathered(accelerator: Any, value: int) -> list[int]:
    """``value`` (a whole number) of every process, in rank order."""
    if accelerator.num_processes == 1:
        return [value]
    import torch

    return [int(n) for n in accelerator.gather(torch.tensor([value], device=accelerator.device)).tolist()]


def _digest(fingerprint: str | None) -> int:
    """A data fingerprint as a number that fits a tensor, to compare the processes' data."""
    import hashlib

    return int.from_bytes(hashlib.sha256(str(fingerprint).encode()).digest()[:7], "big")


def _mean_over_processes(accelerator: Any, value: float | None) -> float | None:
    """``value`` (each process's mean over its share) averaged over the processes."""
    if accelerator.num_processes == 1 or value is None:
        return value
    import torch

    return float(accelerator.reduce(torch.tensor([value], dtype=torch.float64, device=accelerator.device),
                                    reduction="mean")[0])


def _get_rng(order: Any, augmenting: Any) -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "torch": torch.get_rng_state(), "order": order.get_state(),
            "augment": augmenting.get_state()}


def _set_rng(saved: dict[str, Any], order: Any, augmenting: Any) -> None:
    import torch

    random.setstate(_as_tuples(saved["python"]))
    torch.set_rng_state(saved["torch"])
    order.set_state(saved["order"])
    augmenting.set_state(saved["augment"])


def _as_tuples(value: Any) -> Any:
    """random.getstate()'s nested tuples (a round trip through a checkpoint may turn them into lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _autocast(placement: Placement) -> Any:
    import torch

    dtype = training_dtype(placement)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
