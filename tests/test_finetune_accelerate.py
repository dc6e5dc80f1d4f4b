"""The shared training loop under accelerate: two processes on CPU each train on half the data and one
model is published; gradient accumulation; a job killed mid-training resumes to the very weights and
losses of an uninterrupted run; augmentation of training batches only, seeded, refused where a task
cannot use it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmdemo.cli import main
from mmdemo.errors import InvalidInputError
from mmdemo.feedback import FeedbackStore, export_dataset
from mmdemo.finetune import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    FinetuneConfig,
    FinetuneJob,
    InvalidDatasetError,
    adapter_for,
)
from mmdemo.finetune.data import load_export
from mmdemo.finetune.jobs import RESUME_STATE_FILE, resume_config, resume_folder
from mmdemo.tasks import build_tiny_models, open_registry, run

from finetune_util import listing, make_job, tiny_models_folder
from test_finetune import BASE, CAPTIONS, make_settings, picture

FAST = dict(epochs=4, batch_size=3, lr=1e-2, seed=0)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tiny_models_folder(tmp_path_factory, ["blip-caption"])


@pytest.fixture
def settings(tmp_path, tiny_models):
    return make_settings(tmp_path / "data", tiny_models)


@pytest.fixture(scope="module")
def feedback(tmp_path_factory, tiny_models):
    """Six corrected captions, exported with a validation split and all in training."""
    root = tmp_path_factory.mktemp("feedback")
    registry = open_registry(make_settings(root / "app", tiny_models))
    with FeedbackStore(None, root / "app") as store:
        for i, caption in enumerate(CAPTIONS):
            result = run(registry, "image-to-text", image=picture(i), max_new_tokens=8)
            output_id = store.record_result("image-to-text", {"image": picture(i)}, result)
            store.add_feedback(output_id, annotator="alice", thumbs=-1, correction=caption)
        split = export_dataset(store, "image-to-text", root / "split", format="datasets", val_fraction=0.3, seed=0)
        overfit = export_dataset(store, "image-to-text", root / "overfit", format="datasets", val_fraction=0.0)
    return SimpleNamespace(split=split.out_dir, overfit=overfit.out_dir)


def job(settings, name="blip-ft", **options):
    return make_job(settings, "image-to-text", BASE, name, FAST, **options)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# --- accelerate: two processes on CPU ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_under_accelerate_launch_each_train_on_half_the_rows(settings, feedback):
    # The command of the README; `--cpu --num_processes 2` would start one process only.
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "mmdemo", "finetune", "--profile", "tiny", "--data-dir", str(settings.data_dir),
               "--device", "cpu", "--task", "caption", "--base", BASE, "--name", "two-ranks",
               "--dataset", str(feedback.overfit), "--epochs", "2", "--batch-size", "1", "--grad-accum", "2",
               "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                          text=True, timeout=300, cwd=settings.data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # one process printed the result: the main one
    metrics = json.loads((settings.models_dir / "two-ranks" / METRICS_FILE).read_text())
    assert printed["metrics"]["processes"] == metrics["processes"]
    # six rows, two processes: three rows each per epoch, two epochs; batches of one, two per step
    assert metrics["processes"] == {"world_size": 2, "train_rows_seen": [6, 6]}
    assert metrics["steps"] == 4 and [e["steps"] for e in metrics["epochs"]] == [2, 2]
    assert listing(settings) == ["two-ranks"]  # one model, published once; no staging left by either process
    assert FinetuneConfig.load(settings.models_dir / "two-ranks" / RUN_CONFIG_FILE).grad_accum == 2
    assert "two-ranks" in open_registry(settings).catalog
    print(f"2-process accelerate run: {time.perf_counter() - started:.1f}s")


def test_one_process_records_itself_and_gradient_accumulation_counts_optimizer_steps(settings, feedback):
    single = job(settings, "single", dataset=str(feedback.overfit), epochs=2).run()
    assert single.metrics["processes"] == {"world_size": 1, "train_rows_seen": [12]}
    accumulated = job(settings, "accumulated", dataset=str(feedback.overfit), epochs=2, batch_size=1,
                      grad_accum=4).run()
    # six rows of one: six forward passes per epoch, two optimizer steps (4 + 2 passes)
    assert [e["steps"] for e in accumulated.metrics["epochs"]] == [2, 2] and accumulated.metrics["steps"] == 4
    assert accumulated.metrics["processes"]["train_rows_seen"] == [12]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="gradient accumulation"):
            FinetuneConfig("image-to-text", base=BASE, name="x", grad_accum=bad)
    with pytest.raises(InvalidInputError, match="between checkpoints"):
        FinetuneConfig("image-to-text", base=BASE, name="x", checkpoint_every=0)


# --- resume ----------------------------------------------------------------------------------------------

KILL_AT_STEP = """
import json, os, signal, sys
from mmdemo.config import Settings
from mmdemo.finetune import FinetuneConfig, FinetuneJob

settings = Settings(profile="tiny", data_dir=sys.argv[1], device="cpu")
step = int(sys.argv[3])

def kill_at_step(progress):
    if progress.stage == "training" and progress.step == step:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler runs

FinetuneJob(FinetuneConfig(**json.loads(sys.argv[2])), settings, on_progress=kill_at_step).run()
"""


@pytest.mark.parametrize("kill_at, resumed_from", [(4, 3), (6, 4)])  # mid-epoch; an epoch's end (2 steps each)
def test_a_job_killed_mid_training_resumes_to_the_weights_and_losses_of_an_uninterrupted_run(
        settings, feedback, kill_at, resumed_from):
    options = dict(dataset=str(feedback.split), checkpoint_every=3)
    config = FinetuneConfig("image-to-text", base=BASE, name="resumed", **{**FAST, **options})
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(settings.data_dir),
                             json.dumps(config.to_dict()), str(kill_at)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    # the killed run published nothing; its last checkpoint waits, hidden from the catalog
    models = settings.models_dir
    assert not (models / "resumed").exists() and "resumed" not in open_registry(settings).catalog
    import torch

    state = torch.load(resume_folder(models, "resumed") / RESUME_STATE_FILE, weights_only=True)
    assert state["step"] == resumed_from

    code = main(["finetune", "--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu",
                 "--resume", "resumed", "--json"])
    assert code == 0
    resumed = json.loads((models / "resumed" / METRICS_FILE).read_text())
    whole = job(settings, "uninterrupted", **options).run()

    assert resumed["steps"] == whole.metrics["steps"] == 8 and resumed["best_epoch"] == whole.metrics["best_epoch"]
    assert whole.metrics["best_epoch"] == 1  # trained before the kill: the checkpoint carried its weights over
    assert resumed["initial"] == whole.metrics["initial"]
    for ours, theirs in zip(resumed["epochs"], whole.metrics["epochs"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-6)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-6)
    ours, theirs = weights(models / "resumed"), weights(whole.path)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6), key
    assert listing(settings) == ["resumed", "uninterrupted"]  # the checkpoint and the killed run's staging gone


def test_resume_refuses_changed_data_and_a_run_with_no_checkpoint(settings, feedback, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(feedback.split, dataset)
    crashing = job(settings, "changing", dataset=str(dataset), checkpoint_every=1, max_steps=3)

    def crash_at_step_2(progress):  # a crash (not a cancel): the checkpoint stays
        if progress.step == 2 and progress.stage == "training":
            raise RuntimeError("power cut")

    crashing.on_progress = crash_at_step_2
    with pytest.raises(RuntimeError, match="power cut"):
        crashing.run()
    assert resume_folder(settings.models_dir, "changing").is_dir() and not (settings.models_dir / "changing").exists()

    shutil.rmtree(dataset)
    shutil.copytree(feedback.overfit, dataset)  # other rows under the same path
    with pytest.raises(InvalidDatasetError, match="changed since its checkpoint"):
        FinetuneJob(resume_config(settings, "changing"), settings, resume=True).run()
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    assert main(["finetune", *common, "--resume", "changing"]) == 2
    err = capsys.readouterr().err
    assert "changed since its checkpoint" in err and "without --resume" in err
    assert resume_folder(settings.models_dir, "changing").is_dir()  # still there for the right data

    shutil.rmtree(dataset)
    shutil.copytree(feedback.split, dataset)
    assert main(["finetune", *common, "--resume", "changing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["steps"] == 3
    assert listing(settings) == ["changing"]  # the checkpoint is gone with the run published

    assert main(["finetune", *common, "--resume", "never-ran"]) == 1
    assert "no checkpoint to resume 'never-ran'" in capsys.readouterr().err


# --- augmentation ------------------------------------------------------------------------------------------


def test_augmented_training_batches_differ_but_their_labels_do_not_and_repeat_for_a_seed(settings, feedback):
    import torch

    adapter = adapter_for("image-to-text")
    registry = open_registry(settings)
    spec = registry.catalog.get(BASE)
    model, processor = adapter.load(spec, registry.resolve_location(spec), registry.placement_for(spec))
    rows = load_export(feedback.overfit, "image-to-text", adapter.columns).train[0:6]
    ops = adapter.check_augmentations(("crop", "flip", "colour"))
    plain = adapter.collate(model, processor, rows, 40)
    batches = [adapter.collate(model, processor, adapter.augment(rows, ops, torch.Generator().manual_seed(seed)), 40)
               for seed in (1, 1, 2)]
    assert not torch.equal(batches[0]["pixel_values"], plain["pixel_values"])
    for batch in batches:
        assert batch["pixel_values"].shape == plain["pixel_values"].shape
        assert torch.equal(batch["labels"], plain["labels"]) and torch.equal(batch["input_ids"], plain["input_ids"])
    assert torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])  # the same seed, the same batch
    assert not torch.equal(batches[0]["pixel_values"], batches[2]["pixel_values"])


def test_augmentation_is_off_by_default_touches_training_only_and_is_recorded(settings, feedback, monkeypatch):
    assert FinetuneConfig("image-to-text", base=BASE, name="x").augment == ()
    adapter_class = type(adapter_for("image-to-text"))
    augmented_rows = []
    original = adapter_class.augment

    def counting(self, rows, ops, generator):
        augmented_rows.append(len(rows["text"]))
        return original(self, rows, ops, generator)

    monkeypatch.setattr(adapter_class, "augment", counting)
    plain = job(settings, "plain", dataset=str(feedback.split)).run()
    assert augmented_rows == []  # off: never called
    again = job(settings, "plain-again", dataset=str(feedback.split)).run()
    assert again.metrics["epochs"] == [{**e, "seconds": a["seconds"]}
                                       for e, a in zip(plain.metrics["epochs"], again.metrics["epochs"])]

    augmented = job(settings, "augmented", dataset=str(feedback.split), augment=("default",)).run()
    train_rows = augmented.metrics["data"]["rows"]["train"]
    assert sum(augmented_rows) == train_rows * FAST["epochs"]  # training batches only: not validation, evaluation
    assert augmented.metrics["initial"] == plain.metrics["initial"]  # the unaugmented losses before training
    assert [e["train_loss"] for e in augmented.metrics["epochs"]] != [e["train_loss"] for e in plain.metrics["epochs"]]
    saved = json.loads((augmented.path / RUN_CONFIG_FILE).read_text())
    assert saved["augment"] == ["crop", "colour"]  # "default" for captions, resolved
    repeat = job(settings, "augmented-again", dataset=str(feedback.split), augment=("crop", "colour")).run()
    assert [e["train_loss"] for e in repeat.metrics["epochs"]] == [e["train_loss"] for e in augmented.metrics["epochs"]]


def test_augmentations_a_task_cannot_use_are_refused_clearly(settings, feedback, capsys):
    with pytest.raises(InvalidInputError, match="Unknown augmentation 'blur'"):
        FinetuneConfig("image-to-text", base=BASE, name="x", augment=("blur",))
    with pytest.raises(InvalidInputError, match="give it alone"):
        FinetuneConfig("image-to-text", base=BASE, name="x", augment=("default", "crop"))
    with pytest.raises(InvalidInputError, match="cannot use the augmentation.*speed"):
        job(settings, dataset=str(feedback.split), augment=("crop", "speed")).run()
    assert listing(settings) == []
    assert adapter_for("visual-question-answering").check_augmentations(("default",)) == ("crop",)
    assert adapter_for("visual-question-answering").check_augmentations(("flip",)) == ("flip",)  # asked for
    assert "colour" not in adapter_for("zero-shot-image-classification").check_augmentations(("default",))
    with pytest.raises(InvalidInputError, match="automatic-speech-recognition cannot use.*flip"):
        adapter_for("automatic-speech-recognition").check_augmentations(("flip",))
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    assert main(["finetune", *common, "--task", "caption", "--base", BASE, "--name", "x",
                 "--dataset", str(feedback.split), "--augment", "crop,noise"]) == 2
    assert "cannot use the augmentation(s) noise" in capsys.readouterr().err


# --- mixed precision (GPU tier) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_on_cuda_the_loop_autocasts_to_the_registry_dtype_after_a_cpu_job_in_the_same_process(
        tmp_path, tiny_models, feedback, dtype):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    on_cpu = job(make_settings(tmp_path / "cpu", tiny_models), "on-cpu", dataset=str(feedback.split), max_steps=2)
    assert on_cpu.run().metrics["steps"] == 2
    settings = make_settings(tmp_path / "gpu", tiny_models).replace(device="cuda", dtype=dtype)
    result = job(settings, "on-gpu", dataset=str(feedback.overfit), epochs=3).run()
    saved = FinetuneConfig.load(result.path / RUN_CONFIG_FILE)
    assert saved.device.startswith("cuda") and saved.dtype == dtype
    losses = [e["train_loss"] for e in result.metrics["epochs"]]
    assert all(loss == loss and loss < 1e4 for loss in losses) and losses[-1] < result.metrics["initial"]["train_loss"]
    assert {t.dtype for t in weights(result.path).values()} == {torch.float32}  # autocast: the weights stay float32


def test_speech_augmentations_change_the_features_but_not_the_transcripts(tmp_path_factory):
    import numpy as np
    import torch

    from mmdemo.finetune.augment import wav_bytes

    folder = tmp_path_factory.mktemp("whisper") / "tiny-models"
    build_tiny_models(folder, names=["whisper"])
    settings = make_settings(tmp_path_factory.mktemp("speech") / "data", folder)
    registry = open_registry(settings)
    spec = registry.catalog.get("tiny-whisper")
    adapter = adapter_for("automatic-speech-recognition")
    model, processor = adapter.load(spec, registry.resolve_location(spec), registry.placement_for(spec))
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(16_000) / 16_000)).astype(np.float32)
    rows = {"audio": [{"bytes": wav_bytes(tone, 16_000), "path": None}] * 2, "text": ["one two", "three"],
            "language": ["en", "en"], "translate": [False, False]}
    plain = adapter.collate(model, processor, rows, 40)
    ops = adapter.check_augmentations(("default",))
    assert ops == ("speed", "noise", "specaugment")
    for chosen in (("speed",), ("noise",), ("specaugment",), ops):
        generator = torch.Generator().manual_seed(0)
        batch = adapter.augment_batch(adapter.collate(model, processor, adapter.augment(rows, chosen, generator), 40),
                                      chosen, generator)
        assert batch["input_features"].shape == plain["input_features"].shape
        assert not torch.equal(batch["input_features"], plain["input_features"]), chosen
        assert torch.equal(batch["labels"], plain["labels"]), chosen
