"""A fine-tuning job: from a catalog model and feedback to a new catalog model, published atomically.

>>> job = FinetuneJob(FinetuneConfig("image-to-text", base="blip-caption-base", name="blip-products"), settings)
>>> result = job.run()          # or job.start() in a thread; job.progress, job.cancel(), job.status

The checkpoint is written to a hidden staging folder beside its final place and renamed into
``<data_dir>/models/<name>/`` only when complete, so a crash or a cancel never leaves a folder the
catalog would serve. The folder holds the model and processor (``save_pretrained``),
``run_config.json`` (the resolved :class:`FinetuneConfig`), ``metrics.json`` (losses per epoch, the
data's fingerprint and size, the base model and revision, and for tasks with a metric the base's and
the new model's scores on the evaluation data, ``evaluation``) and ``mmdemo-model.json`` (its catalog
entry).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import __version__
from ..catalog import MODEL_ENTRY_FILE, ModelSpec
from ..config import Settings
from ..errors import InvalidInputError, MMDemoError, ModelLoadError
from ..files import replace_folder
from ..placement import Placement
from ..registry import ModelRegistry
from .adapters import FinetuneAdapter, adapter_for
from .config import FinetuneConfig
from .data import TrainingData, export_from_store, load_export, quiet_progress
from .errors import FinetuneCancelled, FinetuneError, InvalidDatasetError
from .evaluate import TaskEvaluation, compared_models, describe_source, format_table, undecoded
from .lineage import METRICS_FILE, RUN_CONFIG_FILE
from .processes import (
    RESUME_STATE_FILE,
    RESUMES,
    check_new_model_name,
    model_folder,
    name_lock,
    remove_stale_staging,
    resume_folder,
    serve_published,
)
from .train import Progress, TrainingState, is_main_process, train, training_dtype, wait_for_everyone
from ..tasks import open_registry

log = logging.getLogger(__name__)

RESUME_BEST = "best"  # in resume_folder(): the best epoch's checkpoint so far, beside the TrainingState
                      # (RESUME_STATE_FILE) and the run_config.json to resume with


class JobStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class FinetuneResult:
    """What a finished job published."""

    spec: ModelSpec           # the new catalog entry
    path: Path                # <data_dir>/models/<name>
    metrics: dict[str, Any]
    swapped: bool = False     # a running registry now serves the new checkpoint under this name
    serve_error: str | None = None  # why a running registry could not swap it in (it keeps the old one)

    @property
    def name(self) -> str:
        return self.spec.id

    def describe(self) -> str:
        """A short text for the CLI and, later, the admin panel."""
        m = self.metrics
        data = m["data"]["rows"]
        best = next((e for e in m["epochs"] if e["epoch"] == m.get("best_epoch")), m["epochs"][-1])
        losses = f"train loss {_fmt(m['initial']['train_loss'])} -> {_fmt(best['train_loss'])}"
        if best["val_loss"] is not None:
            losses += f", validation loss {_fmt(m['initial']['val_loss'])} -> {_fmt(best['val_loss'])}"
        text = (f"Fine-tuned '{m['base']['id']}' into '{self.name}' on {data['train']} training and "
                f"{data['validation']} validation rows: {m['steps']} steps in {m['seconds']:.1f}s, kept epoch "
                f"{best['epoch']} ({losses}). Saved to {self.path}; it is in the catalog as '{self.name}'.")
        added = m.get("model_changes", {}).get("answers_added")
        if added:
            text += f"\nIts answer head grew by {len(added)} answer(s): {', '.join(added[:10])}."
        return text + ("\n" + self.evaluation_table() if self.evaluation_table() else "")

    def evaluation_table(self) -> str:
        """The before/after table of the job's evaluation ('' when the task has no metric yet)."""
        evaluation = self.metrics.get("evaluation")
        if not evaluation:
            return ""
        if "base" not in evaluation:
            return f"No evaluation: no labelled questions ({evaluation['data'].get('kind')})."
        return format_table(compared_models(self.metrics, self.name), evaluation["data"], self.spec.task)


class FinetuneJob:
    """One fine-tuning run, usable from the CLI now and from an admin panel later.

    ``store``: the feedback store to export from when the config names no dataset (opened from
    ``settings`` if None). ``registry``: a running app's registry; the new model is added to its
    catalog, and hot-swapped in with ``replace`` when a model of that name is loaded.
    ``on_progress``: called with a :class:`Progress` after every step (from the job's thread).
    ``resume``: continue from the resumable checkpoint an earlier run of ``config`` left (see
    :func:`resume_config`) rather than start afresh (which replaces any such checkpoint).
    """

    def __init__(self, config: FinetuneConfig, settings: Settings, *, store: Any = None,
                 registry: ModelRegistry | None = None,
                 on_progress: Callable[[Progress], None] | None = None, resume: bool = False) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.config = config
        self.settings = settings
        self.store = store
        self.registry = registry
        self.on_progress = on_progress
        self.resume = resume
        self._checkpointed_best: int | None = None  # the best epoch whose checkpoint the resumable one holds
        self.status = JobStatus.PENDING
        self.progress = Progress("pending")
        self.result: FinetuneResult | None = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control --

    def cancel(self) -> None:
        """Ask the job to stop; it stops at the next step and publishes nothing."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> threading.Thread:
        """Run the job in a background thread; follow it with ``status``, ``progress``, ``wait()``."""
        def body() -> None:
            try:
                self.run()
            except BaseException:  # noqa: BLE001 - recorded in status and error
                pass

        self._thread = threading.Thread(target=body, name=f"finetune-{self.config.name}", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> JobStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    # -- the run --

    def run(self) -> FinetuneResult:
        """Run the job in this thread and return what it published; errors are raised (and recorded)."""
        self.status = JobStatus.RUNNING
        try:
            self.result = self._run()
        except FinetuneCancelled as exc:
            self.status, self.error = JobStatus.CANCELLED, str(exc)
            raise
        except KeyboardInterrupt:
            self.status, self.error = JobStatus.CANCELLED, "interrupted"
            raise
        except BaseException as exc:
            self.status, self.error = JobStatus.FAILED, str(exc) or type(exc).__name__
            raise
        self.status = JobStatus.SUCCEEDED
        self._report(replace(self.progress, stage="done"))
        return self.result

    def _run(self) -> FinetuneResult | None:
        config, settings = self.config, self.settings
        started = time.perf_counter()
        self._report(Progress("preparing"))
        adapter = adapter_for(config.task)
        registry = self.registry or open_registry(settings)
        models_dir = settings.models_dir
        final = model_folder(models_dir, config.name)
        main = is_main_process()  # under `accelerate launch`, the other processes train and publish nothing
        if main:
            models_dir.mkdir(parents=True, exist_ok=True)
        with name_lock(models_dir, config.name) if main else contextlib.nullcontext():
            # 1. the name is new (or names our own earlier model, with overwrite); the base is a catalog model
            if main:
                check_new_model_name(registry.catalog, models_dir, config.name, overwrite=config.overwrite)
            base = registry.catalog.get(config.base)
            adapter.check_base(base)
            trained = adapter.training_spec(base, registry.catalog)  # a faster-whisper model: its twin
            placement = registry.placement_for(trained)
            config = self.config = config.replace(device=placement.device, dtype=training_dtype(placement),
                                                  augment=adapter.check_augmentations(config.augment),
                                                  **_store_export_options(config))
            location = registry.resolve_location(trained)
            base_location = location if trained is base else registry.resolve_location(base)
            resumed = self._resume_state() if self.resume else None
            self._checkpointed_best = resumed.metrics.get("best_epoch") if resumed else None
            staging = models_dir / f".{config.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            if main:
                remove_stale_staging(models_dir)
                if not self.resume:
                    shutil.rmtree(resume_folder(models_dir, config.name), ignore_errors=True)  # a new run
                staging.mkdir()
                if resumed is not None and (resume_folder(models_dir, config.name) / RESUME_BEST).is_dir():
                    shutil.copytree(resume_folder(models_dir, config.name) / RESUME_BEST, staging, dirs_exist_ok=True)
            try:
                with self._training_data(adapter.columns, adapter.text_column) as exported:
                    evaluation = self._evaluation_data(adapter.evaluation, exported)
                    exported = without_held_out(exported, evaluation)
                    data = adapter.prepare_data(exported)
                    if resumed is not None and resumed.fingerprint != data.fingerprint:
                        raise InvalidDatasetError(
                            f"The training data of '{config.name}' changed since its checkpoint (fingerprint "
                            f"{resumed.fingerprint}, now {data.fingerprint}): a resumed run needs the same rows. "
                            "Start a new run (without --resume) to train on the new data.")
                    metrics, params_m = self._train(adapter, base, trained, (location, base_location), placement,
                                                    data, staging, evaluation, registry, resumed)
                if not main:
                    wait_for_everyone()  # until the main process has published the model
                    return None
                lora = metrics.get("lora")
                # 6. the run's record and the catalog entry, then the atomic move into place
                self._report(replace(self.progress, stage="saving", step=metrics["steps"]))
                metrics = {"base": metrics.pop("base"), "data": data.describe(), **metrics,
                           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "versions": _versions()}
                config.save(staging / RUN_CONFIG_FILE)
                (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
                entry = {"task": config.task, "kind": base.kind, "dtype": base.dtype, "params_m": round(params_m, 3),
                         "description": config.description or _description(base, data),
                         "defaults": dict(base.defaults), **adapter.catalog_entry(base, staging)}
                if lora and not lora["merged"]:
                    entry["adapter_of"] = base.id  # served on the base's loaded copy
                (staging / MODEL_ENTRY_FILE).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
                if self._cancel.is_set():
                    raise FinetuneCancelled(f"Fine-tuning '{config.name}' was cancelled before it was published.")
                replace_folder(staging, final)
                shutil.rmtree(resume_folder(models_dir, config.name), ignore_errors=True)  # done: nothing to resume
                wait_for_everyone()
            except FinetuneCancelled:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(resume_folder(models_dir, config.name), ignore_errors=True)  # stopped on purpose
                raise
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # a crash or an error: its checkpoint stays, to resume
                raise
        result = FinetuneResult(ModelSpec(id=config.name, source=f"local-dir:{final.resolve()}", **entry), final,
                                metrics)
        self._serve(result)
        log.info("fine-tuned %s into %s in %.1fs", base.id, config.name, time.perf_counter() - started)
        return result

    def _train(self, adapter: FinetuneAdapter, base: ModelSpec, trained: ModelSpec, locations: tuple[str, str],
               placement: Placement, data: TrainingData, staging: Path,
               evaluation: tuple[list[Any], dict[str, Any]] | None,
               registry: ModelRegistry | None = None,
               resumed: TrainingState | None = None) -> tuple[dict[str, Any], float]:
        """Steps 2 and 3: load the base (``trained``: the model that trains, the base itself or its twin),
        train it, the best epoch's checkpoint saved in ``staging``; the base and the checkpoint scored on
        ``evaluation`` (questions, where they come from) if given. ``locations``: the trained model's and
        the base's; ``registry``: the models a metric scores with; ``resumed``: the checkpoint training
        continues from. Only the main process scores and saves. Returns the metrics (with the base's
        identity) and the size in millions of parameters."""
        from ..registry import free_device_memory
        from ..tasks import get_task, quiet_libraries

        # 2. the base model, float32 weights on the registry's device
        quiet_libraries()  # no progress bars for loading and saving weights
        try:
            model, processor = adapter.load(trained, locations[0], placement)
        except MMDemoError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(base.id, f"{type(exc).__name__}: {exc}") from exc
        main = is_main_process()
        questions, scores = (evaluation[0], {}) if evaluation and main else ([], {})
        scoring = adapter.evaluation
        predictions: dict[str, list[Any]] = {"base": [], "new": []}
        try:
            # 3. the base scored before training; the model fitted to the data (e.g. new answers)
            if questions and trained is base:
                bundle = adapter.serving_bundle(model, processor, base, placement)
                scores["base"] = scoring.score(scoring.loaded_model_answers(base, bundle, registry), questions,
                                               predictions["base"])
                del bundle
            elif questions:  # the base as it serves (e.g. on CTranslate2), not its twin
                bundle = get_task(base.task).load(base, locations[1], placement)
                scores["base"] = scoring.score(scoring.loaded_model_answers(base, bundle, registry), questions,
                                               predictions["base"])
                del bundle
            changes = adapter.prepare_model(model, processor, data, self.config)
            lora = self._lora_plan(adapter, base, trained)
            if lora:
                from .lora import add_lora, adapter_params_m, save_adapter

                model = add_lora(model, adapter, trained.kind, self.config)
                lora["params_m"] = round(adapter_params_m(model), 4)
                save = lambda epoch: save_adapter(model, processor, adapter, staging)  # noqa: E731
            else:
                save = lambda epoch: adapter.save(model, processor, staging)  # noqa: E731
            # 4. train, writing the best epoch's checkpoint (or LoRA adapter) into the staging folder
            metrics = train(model, processor, adapter, data, self.config, placement, save_best=save,
                            report=self._report, should_stop=self._cancel.is_set,
                            checkpoint=lambda state: self._checkpoint(state, data.fingerprint, staging),
                            resume_from=resumed)
            if lora:
                metrics["lora"] = lora
                if lora["merged"] and main:
                    from .lora import merge_saved

                    model = merge_saved(model, processor, adapter, staging)
            metrics["base"] = {"id": base.id, "kind": base.kind, "source": base.source, "revision": base.revision,
                               "commit": getattr(model.config, "_commit_hash", None)}
            if trained is not base:
                metrics["base"]["trained_twin"] = trained.id
            if changes:
                metrics["model_changes"] = changes
            full_m = sum(p.numel() for p in model.parameters()) / 1e6
            params_m = lora["params_m"] if lora and not lora["merged"] else full_m  # an adapter: its own size
        finally:
            del model, processor  # the device memory goes back before a registry loads the result
            free_device_memory(placement.device)
        if not main:
            return metrics, params_m
        adapter.convert_for_serving(base, staging)  # e.g. into CTranslate2 for a faster-whisper base
        if evaluation and main:
            # 5. the saved checkpoint, loaded as the app will load it, scored on the same questions
            if questions:
                saved = replace(base, id=self.config.name, source=f"local-dir:{staging.resolve()}", revision=None)
                if lora and not lora["merged"]:  # the adapter on a copy of its base, as the registry serves it
                    from ..lora import active, read_adapter, serve_on

                    bundle = get_task(base.task).load(base, locations[1], placement)
                    serve_on(bundle, saved.id, read_adapter(staging))
                    with active(saved.id):
                        scores["new"] = scoring.score(scoring.loaded_model_answers(saved, bundle, registry),
                                                      questions, predictions["new"])
                else:
                    bundle = adapter.load_saved(saved, staging, locations[1], placement)
                    scores["new"] = scoring.score(scoring.loaded_model_answers(saved, bundle, registry), questions,
                                                  predictions["new"])
                del bundle
                free_device_memory(placement.device)
                scores.update(scoring.save_artifacts(staging, questions, predictions))
            metrics["evaluation"] = {"data": evaluation[1], **scores}
        return metrics, params_m

    def _checkpoint(self, state: TrainingState, fingerprint: str, staging: Path) -> None:
        """Write ``state`` and the best epoch's checkpoint so far (``staging``) as the job's resumable
        checkpoint, replacing the previous one atomically (a kill while writing leaves the previous one).
        The best checkpoint is copied once per best epoch: while it stays the best, its files (never written
        again once there) are linked from the previous checkpoint."""
        import torch

        models_dir = self.settings.models_dir
        previous = resume_folder(models_dir, self.config.name) / RESUME_BEST
        writing = models_dir / f".{self.config.name}.partial-{os.getpid()}-resume{uuid.uuid4().hex[:8]}"
        best_epoch = state.metrics.get("best_epoch")
        try:
            if best_epoch is not None and best_epoch == self._checkpointed_best and previous.is_dir():
                shutil.copytree(previous, writing / RESUME_BEST, copy_function=os.link)
            elif any(staging.iterdir()):
                shutil.copytree(staging, writing / RESUME_BEST)
            writing.mkdir(exist_ok=True)
            state.fingerprint = fingerprint
            torch.save(state.to_dict(), writing / RESUME_STATE_FILE)
            self.config.save(writing / RUN_CONFIG_FILE)
            replace_folder(writing, resume_folder(models_dir, self.config.name))
            self._checkpointed_best = best_epoch
        except BaseException:
            shutil.rmtree(writing, ignore_errors=True)
            raise

    def _resume_state(self) -> TrainingState:
        """The checkpoint of the run this job resumes, or a clear error when there is none."""
        import torch

        folder = resume_folder(self.settings.models_dir, self.config.name)
        if not (folder / RESUME_STATE_FILE).is_file():
            raise FinetuneError(f"There is no checkpoint to resume '{self.config.name}' from (no {folder}); "
                                "start a new run instead.")
        saved = resume_config(self.settings, self.config.name)
        changed = sorted(key for key, value in self.config.to_dict().items() if saved.to_dict()[key] != value)
        if changed:
            raise InvalidInputError(f"The checkpoint of '{self.config.name}' is of a run with other settings "
                                    f"({', '.join(changed)}); resume it as it was (mmdemo finetune --resume "
                                    f"{self.config.name}) or start a new run.")
        return TrainingState(**torch.load(folder / RESUME_STATE_FILE, weights_only=True))

    def _lora_plan(self, adapter: FinetuneAdapter, base: ModelSpec, trained: ModelSpec) -> dict[str, Any] | None:
        """How the run uses LoRA (None: a full fine-tune): rank, alpha, targets, and whether the adapter is
        merged. A base that serves another format (faster-whisper on CTranslate2) needs a full checkpoint:
        its adapter is always merged."""
        from .lora import lora_targets

        config = self.config
        if adapter.manages_lora or not config.uses_lora(base.params_m):
            return None
        merged = config.merge or trained is not base
        return {"rank": config.lora_rank, "alpha": config.alpha,
                "targets": list(lora_targets(adapter, trained.kind, config)),
                "modules_to_save": list(adapter.lora_modules_to_save.get(trained.kind, ())), "merged": merged,
                **({"merged_because": f"{base.kind} serves a full checkpoint"} if merged and not config.merge else {})}

    def _evaluation_data(self, evaluation: TaskEvaluation | None,
                         exported: TrainingData) -> tuple[list[Any], dict[str, Any]] | None:
        """The questions the base and the new model are scored on (``evaluation``: the task's, None when the
        task has no metric yet), and where they come from; None without a metric. Read before training, so
        that bad evaluation data fails early."""
        config = self.config
        if evaluation is None:
            return None
        if config.eval_dataset is not None:
            questions = evaluation.examples_from_export(Path(config.eval_dataset))
            source = {"kind": "dataset", "dataset": str(Path(config.eval_dataset).resolve())}
        elif config.eval_campaign is not None:
            with self._store() as store:
                questions = evaluation.examples_from_campaign(store, config.eval_campaign)
            source = {"kind": "campaign", "campaign": config.eval_campaign}
        else:
            questions = evaluation.examples_from_rows(undecoded(exported.validation), split_groups=True)
            source = {"kind": "validation split"}
        return questions, describe_source(questions, source)

    @contextlib.contextmanager
    def _training_data(self, columns: tuple[str, ...], text_column: str | None = None) -> Iterator[TrainingData]:
        """The exported dataset the config names (or an image folder, for a task with a ``text_column``), or
        the store's feedback exported for this run."""
        config = self.config
        if config.dataset is not None:
            yield load_export(Path(config.dataset), config.task, columns, text_column=text_column)
            return
        with self._store() as store, export_from_store(
                store, config.task, columns, self.settings.exports_dir, only=config.only, since=config.since,
                val_fraction=config.val_fraction, seed=config.seed) as data:
            yield data

    @contextlib.contextmanager
    def _store(self) -> Iterator[Any]:
        """The job's feedback store, or one opened from the settings for as long as it is needed."""
        if self.store is not None:
            yield self.store
            return
        from ..feedback import FeedbackStore

        with FeedbackStore.from_settings(self.settings) as store:
            yield store

    def _serve(self, result: FinetuneResult) -> None:
        """Tell a running registry about the new model (see :func:`serve_published`)."""
        if self.registry is not None:
            served = serve_published(self.registry, result.spec)
            result.swapped, result.serve_error = served["swapped"], served["serve_error"]

    def _report(self, progress: Progress) -> None:
        self.progress = progress
        if self.on_progress is not None:
            self.on_progress(progress)


def without_held_out(data: TrainingData,
                     evaluation: tuple[list[Any], dict[str, Any]] | None) -> TrainingData:
    """``data`` without the rows about outputs that the evaluation campaign labelled (a store export
    takes all feedback, the held-out campaign's included); how many went is noted in its source."""
    held_out = {output_id for question in (evaluation[0] if evaluation else []) for output_id in question.output_ids}
    if not held_out or "output_id" not in data.train.column_names:
        return data

    def keep(split: Any) -> Any:
        with quiet_progress():
                return split.filter(lambda ids: [i not in held_out for i in ids], input_columns="output_id",
                                batched=True, keep_in_memory=True)

    train, validation = keep(data.train), keep(data.validation)
    removed = data.train.num_rows + data.validation.num_rows - train.num_rows - validation.num_rows
    if train.num_rows == 0:
        raise InvalidDatasetError("Every training row is a label of the evaluation campaign; train on other "
                                  "feedback (--dataset, --since) or evaluate on another campaign.")
    return TrainingData(train, validation, {**data.source, "held_out_rows_removed": removed}, data.fingerprint,
                        {"train": train.num_rows, "validation": validation.num_rows})


def resume_config(settings: Settings, name: str) -> FinetuneConfig:
    """The configuration of the run that left a resumable checkpoint for ``name`` (``mmdemo finetune
    --resume NAME``), or a clear error when there is none."""
    saved = resume_folder(settings.models_dir, name) / RUN_CONFIG_FILE
    if not saved.is_file():
        raise FinetuneError(f"There is no checkpoint to resume '{name}' from: no run of that name was "
                            "interrupted (a finished or cancelled run leaves none).")
    return FinetuneConfig.load(saved)


def _store_export_options(config: FinetuneConfig) -> dict[str, Any]:
    """Without a dataset the store's feedback is exported: its options with their defaults filled in."""
    if config.dataset is not None:
        return {}
    return {"only": config.only or "approved", "val_fraction": 0.1 if config.val_fraction is None else config.val_fraction}


def _description(base: ModelSpec, data: TrainingData) -> str:
    return (f"{base.id} fine-tuned on {data.rows['train']} feedback examples "
            f"({datetime.now(timezone.utc):%Y-%m-%d}).")


def _versions() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    return {"mmdemo": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_finetune(config: FinetuneConfig, settings: Settings, **job_options: Any) -> FinetuneResult:
    """Run one fine-tuning job to the end in this thread (see :class:`FinetuneJob` for the options)."""
    return FinetuneJob(config, settings, **job_options).run()




# --- a job of the store, in its own process (`mmdemo finetune --job-id ID`) ---------------------------


def run_stored_job(job_id: str, settings: Settings) -> int:
    """Run the store's job ``job_id`` in this process, writing its progress and end into the store.

    Started by the app's :class:`~mmdemo.finetune.processes.JobRunner` (or by hand for a pending job).
    On CPU the process runs niced, with its torch threads capped at half the cores, so that serving keeps
    its share. SIGTERM cancels: the job stops at its next step and publishes nothing. The log (this
    process's output) is copied into the new model's folder. Returns the exit status."""
    import signal

    import torch

    from ..feedback import FeedbackStore
    from ..feedback.finetune_jobs import CANCELLED, FAILED, PENDING, SUCCEEDED, FinetuneJobStore
    from .processes import MODEL_LOG_FILE

    cancelled = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    with FeedbackStore.from_settings(settings) as store:
        jobs = FinetuneJobStore(store)
        record = jobs.get(job_id)
        if record.state == PENDING:  # started by hand rather than by an app
            jobs.claim(job_id, pid=os.getpid(), host=os.uname().nodename, log_path="")
        elif record.pid is None:
            jobs.set_pid(job_id, os.getpid())
        process: dict[str, Any] = {"pid": os.getpid()}
        if not record.device.startswith("cuda"):
            process["nice"] = os.nice(10)
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        process["threads"] = torch.get_num_threads()
        print(f"fine-tuning job {job_id}: {record.name} from {record.base} ({record.task}) on {record.device}, "
              f"process {process}", flush=True)
        reporter = _StoreReporter(jobs, job_id, process)
        options = dict(record.config)
        resumes = options.pop(RESUMES, None)  # a job that continues a failed one from its checkpoint
        if resumes:
            print(f"resuming the run of job {resumes} from its last checkpoint", flush=True)
        job = FinetuneJob(FinetuneConfig(**options), settings, store=store, on_progress=reporter, resume=bool(resumes))
        if cancelled.is_set():
            job.cancel()
        signal.signal(signal.SIGTERM, lambda *_: job.cancel())
        try:
            result = job.run()
        except FinetuneCancelled as exc:
            jobs.finish(job_id, CANCELLED, error=str(exc), progress=reporter.last)
            print(f"cancelled: {exc}", flush=True)
            return 1
        except BaseException as exc:
            message = str(exc) if isinstance(exc, MMDemoError) else f"{type(exc).__name__}: {exc}"
            jobs.finish(job_id, FAILED, error=message, progress=reporter.last)
            log.exception("fine-tuning job %s failed", job_id)
            return 1
        # The job's last reports (saving, done) name no epoch or losses: those of its last epoch.
        last = result.metrics["epochs"][-1]
        final = {**reporter.last, "stage": "done", "epoch": last["epoch"], "train_loss": last["train_loss"],
                 "val_loss": last["val_loss"], "eta_seconds": 0}
        print(result.describe(), flush=True)
        log_file = jobs.get(job_id).log_path
        if log_file and Path(log_file).is_file():
            shutil.copyfile(log_file, result.path / MODEL_LOG_FILE)  # the log is kept with the model
        jobs.finish(job_id, SUCCEEDED, progress=final, result={
            "model": result.name, "saved_to": str(result.path), "summary": result.describe(),
            "metrics": json.loads(json.dumps(result.metrics, default=str)), "spec": result.spec.to_dict()})
        return 0


class _StoreReporter:
    """A job's progress written into the store: at each new stage, and at most every ``interval`` s."""

    def __init__(self, jobs: Any, job_id: str, process: dict[str, Any], interval: float = 0.5) -> None:
        self.jobs, self.job_id, self.process, self.interval = jobs, job_id, process, interval
        self.last: dict[str, Any] = {"stage": "preparing", "process": process}
        self._written = 0.0
        self._training_started: tuple[float, int] | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.stage == "training" and self._training_started is None:
            self._training_started = (now, progress.step)
        eta = None
        if self._training_started and progress.total_steps and progress.step > self._training_started[1]:
            since, first = self._training_started
            eta = round((now - since) / (progress.step - first) * (progress.total_steps - progress.step), 1)
        info = {"stage": progress.stage, "epoch": progress.epoch, "epochs": progress.epochs, "step": progress.step,
                "total_steps": progress.total_steps, "train_loss": progress.train_loss,
                "val_loss": progress.val_loss, "eta_seconds": eta, "process": self.process}
        new_stage = info["stage"] != self.last.get("stage")
        self.last = info
        if new_stage or now - self._written >= self.interval:
            self._written = now
            self.jobs.report(self.job_id, info)
            print(_progress_line(info), flush=True)  # the job's log


def _progress_line(info: dict[str, Any]) -> str:
    return "  ".join([f"{info['stage']}", f"epoch {info['epoch']}/{info['epochs']}",
                      f"step {info['step']}/{info['total_steps']}", f"train loss {_fmt(info['train_loss'])}",
                      f"validation loss {_fmt(info['val_loss'])}",
                      f"eta {'-' if info['eta_seconds'] is None else info['eta_seconds']} s"])
