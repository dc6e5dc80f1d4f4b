"""Fine-tuning on feedback: BLIP captioning trained on exported corrections, published atomically as a
catalog model that the registry serves; typed errors, cancels and crashes that publish nothing."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mmdemo.catalog import MODEL_ENTRY_FILE, read_model_folders
from mmdemo.tasks import task_catalog
from mmdemo.cli import main
from mmdemo.config import Settings
from mmdemo.errors import InvalidInputError, UnknownModelError
from mmdemo.feedback import FeedbackStore, export_dataset
from mmdemo.finetune import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    FinetuneCancelled,
    FinetuneConfig,
    FinetuneJob,
    InvalidDatasetError,
    InvalidModelNameError,
    JobStatus,
    UnsupportedBaseError,
    adapter_for,
)
from mmdemo.finetune.caption import caption_metrics
from mmdemo.finetune.data import load_export
from mmdemo.finetune.evaluate import LabelledQuestion
from mmdemo.finetune.train import evaluate
from mmdemo.registry import Placement
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.tasks import run
from mmdemo.tasks.spec import register_task, unregister_task

from finetune_util import (ADAPTER_FILES, counting_registry, listing, make_job, peft_twin, served_output,
                           tiny_models_folder)
from test_task_spec import short_caption_spec

BASE = "tiny-blip-caption"
CAPTIONS = (
    "a red car parked next to a blue truck",
    "a dog running on the grass in the park",
    "a bird standing on a branch of a tree",
    "a boat floating on the water at sunset",
    "a plate of food with broccoli and rice",
    "an airplane flying in a clear blue sky",
)
# Small and quick: the tiny BLIP learns these six captions by heart within 20 steps.
FAST = dict(epochs=10, batch_size=3, lr=1e-2, seed=0)


def picture(i: int) -> Image.Image:
    image = Image.new("RGB", (24, 24), (40 * i, 255 - 40 * i, (70 * i) % 256))
    image.putpixel((i, i), (255, 255, 255))
    return image


@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """Only the tiny BLIP captioner, built once for this module."""
    return tiny_models_folder(tmp_path_factory, ["blip-caption"])


def make_settings(data_dir: Path, tiny_models: Path) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "tiny-models").exists():
        (data_dir / "tiny-models").symlink_to(tiny_models, target_is_directory=True)
    return Settings(profile="tiny", data_dir=data_dir, device="cpu")


@pytest.fixture
def settings(tmp_path, tiny_models) -> Settings:
    """A data directory of its own per test: fine-tuned models land in its models/ folder."""
    return make_settings(tmp_path / "data", tiny_models)


@pytest.fixture(scope="module")
def feedback(tmp_path_factory, tiny_models):
    """The real path: the tiny captioner's outputs recorded in a store, corrected by a person, exported."""
    root = tmp_path_factory.mktemp("feedback")
    registry = open_registry(make_settings(root / "app", tiny_models))
    store = FeedbackStore(None, root / "app")
    for i, caption in enumerate(CAPTIONS):
        result = run(registry, "image-to-text", image=picture(i), max_new_tokens=8)
        output_id = store.record_result("image-to-text", {"image": picture(i)}, result)
        store.add_feedback(output_id, annotator="alice", thumbs=-1, correction=caption)
    split = export_dataset(store, "image-to-text", root / "split", format="datasets", val_fraction=0.3, seed=0)
    assert split.rows["default"]["train"] >= 4 and split.rows["default"]["validation"] >= 1
    overfit = export_dataset(store, "image-to-text", root / "overfit", format="datasets", val_fraction=0.0)
    yield SimpleNamespace(store=store, split=split.out_dir, overfit=overfit.out_dir)
    store.close()


def job(settings: Settings, name: str = "blip-ft", **options) -> FinetuneJob:
    return make_job(settings, "image-to-text", BASE, name, FAST, **options)



# --- the whole slice -------------------------------------------------------------------------------


def test_finetuning_learns_the_corrections_and_publishes_a_servable_model(settings, feedback):
    dataset = feedback.overfit  # all six examples in training: the model learns them by heart
    seen = []
    finished = job(settings, dataset=str(dataset), on_progress=seen.append)
    result = finished.run()

    # the checkpoint, its run config and metrics, all in one folder under the data directory
    assert finished.status is JobStatus.SUCCEEDED and result.path == settings.models_dir / "blip-ft"
    assert listing(settings) == ["blip-ft"]  # nothing half-written beside it
    files = set(os.listdir(result.path))
    assert {"model.safetensors", "config.json", "tokenizer.json", RUN_CONFIG_FILE, METRICS_FILE, MODEL_ENTRY_FILE} <= files
    saved = FinetuneConfig.load(result.path / RUN_CONFIG_FILE)
    assert saved == finished.config and saved.device == "cpu" and saved.dtype == "float32"
    assert saved.dataset == str(dataset) and saved.lr == FAST["lr"]
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["base"] == {"id": BASE, "kind": "blip", "source": "tiny:blip-caption", "revision": None,
                               "commit": None}
    assert metrics["data"]["rows"] == {"train": 6, "validation": 0}
    assert metrics["data"]["fingerprint"].startswith("sha256:") and metrics["steps"] == 20
    assert [(e["epoch"], e["steps"]) for e in metrics["epochs"]] == [(n, 2) for n in range(1, 11)]
    assert metrics["best_epoch"] == 10 and metrics["selected_by"].startswith("last epoch")

    # it learnt: the checkpoint's loss on the training captions is far below the base model's
    adapter = adapter_for("image-to-text")
    placement = Placement("cpu", "float32")
    model, processor = adapter.load(result.spec, str(result.path), placement)
    data = load_export(dataset, "image-to-text", adapter.columns)
    after = evaluate(model, processor, adapter, data.train, batch_size=3, max_length=40, placement=placement)
    before = metrics["initial"]["train_loss"]
    assert after < 0.6 * before, (before, after)

    # progress: every step reported in order, each epoch's end, then done
    assert [p.step for p in seen if p.stage == "training"] == list(range(21))
    assert sum(p.stage == "validated" for p in seen) == 10 and seen[-1].stage == "done"
    assert (seen[-1].epoch, seen[-1].step) == (10, 20) and seen[-1].train_loss is not None  # the end keeps them

    # served like any catalog model, by a registry started afterwards (the app after a restart)
    registry = open_registry(settings)
    spec = registry.catalog.get("blip-ft", "image-to-text")
    assert spec.kind == "blip" and spec.source == f"local-dir:{result.path.resolve()}"
    assert registry.catalog.default_for("image-to-text").id == BASE  # built-in models stay the default
    answer = run(registry, "image-to-text", "blip-ft", image=picture(0), max_new_tokens=12)
    assert answer["model"]["id"] == "blip-ft" and isinstance(answer["text"], str) and answer["text"]


def test_the_epoch_with_the_best_validation_loss_is_kept(settings, feedback):
    result = job(settings, dataset=str(feedback.split), epochs=4).run()
    epochs = result.metrics["epochs"]
    best = min(epochs, key=lambda e: e["val_loss"])
    assert result.metrics["best_epoch"] == best["epoch"] < 4  # six examples: it overfits after that
    assert result.metrics["best_val_loss"] == best["val_loss"] and epochs[-1]["val_loss"] > best["val_loss"]
    adapter = adapter_for("image-to-text")
    placement = Placement("cpu", "float32")
    model, processor = adapter.load(result.spec, str(result.path), placement)
    data = load_export(feedback.split, "image-to-text", adapter.columns)
    kept = evaluate(model, processor, adapter, data.validation, batch_size=3, max_length=40, placement=placement)
    assert kept == pytest.approx(best["val_loss"], rel=1e-4)


def test_training_from_the_store_matches_the_export_and_is_deterministic(settings, feedback):
    store, dataset = feedback.store, feedback.split
    first = job(settings, "from-store", store=store, val_fraction=0.3, max_steps=4).run()
    again = job(settings, "again", dataset=str(dataset), max_steps=4).run()
    assert first.metrics["data"]["source"]["only"] == "approved"
    assert first.metrics["data"]["fingerprint"] == again.metrics["data"]["fingerprint"]  # the same rows
    assert [e["train_loss"] for e in first.metrics["epochs"]] == [e["train_loss"] for e in again.metrics["epochs"]]
    assert first.metrics["steps"] == 4 and len(first.metrics["epochs"]) == 2
    saved = FinetuneConfig.load(first.path / RUN_CONFIG_FILE)
    assert saved.dataset is None and saved.only == "approved" and saved.val_fraction == 0.3
    assert not [p for p in settings.exports_dir.iterdir()]  # the temporary export is gone


# --- caption metrics: BLEU-4, ROUGE-L, CIDEr-D -----------------------------------------------------------


def scored_captions(*pairs: tuple[str, tuple[str, ...]]) -> list:
    image = Image.new("RGB", (8, 8))
    return [(LabelledQuestion(image, "", references), caption) for caption, references in pairs]


def test_caption_metrics_by_hand():
    same = caption_metrics(scored_captions(("A cat sat on the mat.", ("a cat sat on the mat",)),
                                           ("two dogs play", ("two dogs play",))))
    assert same["bleu4"] == 1.0 and same["rouge_l"] == 1.0 and same["images"] == 2
    # CIDEr-D, identical captions: every 1-4-gram weighs tf * log(2 / df); per n the clipped cosine is 1 where
    # the caption has n-grams of any weight: "a cat sat on the mat" has all four n (1 each, x10 / 4 * 4 = 10);
    # "two dogs play" has no 4-gram (0), so 10 * 3 / 4 = 7.5; the mean is 8.75
    assert same["cider_d"] == 8.75
    disjoint = caption_metrics(scored_captions(("a red car", ("two dogs play",)), ("blue sky", ("a cat",))))
    assert disjoint == {"bleu4": 0.0, "rouge_l": 0.0, "cider_d": 0.0, "images": 2}
    # BLEU-4 worked: "a cat sat on the mat" against "a cat sat on a mat": clipped 1-grams 5/6 (one "a"),
    # 2-grams 3/5 (a cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3; same length, no brevity penalty:
    # (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4) = 0.5373. ROUGE-L: LCS "a cat sat on mat" = 5 words,
    # precision = recall = 5/6, so F = 5/6 whatever beta.
    worked = caption_metrics(scored_captions(("a cat sat on the mat", ("a cat sat on a mat",))))
    assert worked["bleu4"] == pytest.approx((1 / 12) ** 0.25, abs=1e-4)
    assert worked["rouge_l"] == pytest.approx(5 / 6, abs=1e-4)
    assert worked["cider_d"] == 0.0  # one image: every n-gram is in all (1) images' references, weight log(1/1)
    # brevity penalty: 7 words against 8, every n-gram matches: exp(1 - 8/7); ROUGE-L: P = 1, R = 7/8,
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.875 / 2.315 = 0.9222
    short = caption_metrics(scored_captions(("a black cat sat on the mat", ("a black cat sat on the mat today",))))
    assert short["bleu4"] == pytest.approx(math.exp(1 - 8 / 7), abs=1e-4)
    assert short["rouge_l"] == pytest.approx(2.44 * 0.875 / 2.315, abs=1e-4)
    # several references: the closest length for brevity, clipping by the reference with the most of an n-gram,
    # the best LCS; CIDEr-D averages over references. "a dog" is right for image 1 (one of its two references)
    # and wrong for image 2: image 1 scores (10 * 2/4 for "a dog" + 0 for "a puppy") / 2 = 2.5 ("a" weighs 0:
    # it is in both images' references)
    several = caption_metrics(scored_captions(("a dog", ("a dog", "a puppy")), ("a dog", ("a cat",))))
    assert several["cider_d"] == pytest.approx((2.5 + 0.0) / 2)
    assert several["rouge_l"] == pytest.approx((1.0 + 0.5) / 2)  # image 2: LCS "a", P = R = 1/2


def test_a_caption_job_reports_its_metrics_before_and_after_and_evaluate_prints_them(settings, feedback, capsys):
    # 80 steps: the tiny BLIP then writes the six captions word for word (20 steps only lower the loss)
    result = job(settings, dataset=str(feedback.overfit), eval_dataset=str(feedback.overfit), epochs=40).run()
    evaluation = json.loads((result.path / METRICS_FILE).read_text())["evaluation"]
    assert evaluation["data"]["questions"] == 6 and evaluation["data"]["biased"] is False
    base, new = evaluation["base"], evaluation["new"]
    assert base["images"] == new["images"] == 6
    # the random base writes nonsense; the new model learnt these captions by heart (perfect: 1, 1 and 10)
    assert base["bleu4"] < 0.1 and base["rouge_l"] < 0.3 and base["cider_d"] < 1.0
    assert new["bleu4"] > 0.9 and new["rouge_l"] > 0.9 and new["cider_d"] > 9.0
    assert "BLEU-4" in result.describe() and "CIDEr-D" in result.describe()
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    assert main(["evaluate", *common, "--task", "caption", "--models", f"{BASE},blip-ft",
                 "--dataset", str(feedback.overfit), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"]["blip-ft"] == new and printed["models"][BASE] == base
    assert main(["evaluate", *common, "--task", "caption", "--models", "blip-ft",
                 "--dataset", str(feedback.overfit)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["model", "BLEU-4", "ROUGE-L", "CIDEr-D"]


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "has space", "", "x" * 65, "a..b"])
def test_unsafe_model_names_are_refused(name):
    with pytest.raises(InvalidModelNameError):
        FinetuneConfig("image-to-text", base=BASE, name=name)


def test_unknown_or_unsuitable_bases_and_bad_data_are_typed_errors(settings, feedback, tmp_path):
    dataset = feedback.split
    with pytest.raises(UnknownModelError, match="Unknown model 'no-such-model'"):
        FinetuneJob(FinetuneConfig("image-to-text", base="no-such-model", name="x", dataset=str(dataset)),
                    settings).run()
    with pytest.raises(UnsupportedBaseError, match="cannot be fine-tuned"):
        FinetuneJob(FinetuneConfig("image-to-text", base="tiny-clip", name="x", dataset=str(dataset)), settings).run()
    register_task(short_caption_spec())  # a task whose descriptor names no fine-tuning adapter
    try:
        with pytest.raises(UnsupportedBaseError, match="not available for short-image-to-text"):
            FinetuneJob(FinetuneConfig("short-image-to-text", base="tiny-short", name="x"), settings).run()
    finally:
        unregister_task("short-image-to-text")
    with pytest.raises(InvalidModelNameError, match="already a catalog model"):
        job(settings, "tiny-blip-vqa", dataset=str(dataset)).run()
    with pytest.raises(InvalidDatasetError, match="does not exist"):
        job(settings, dataset=str(tmp_path / "missing")).run()
    other = export_dataset(feedback.store, "image-to-text", tmp_path / "jsonl", format="jsonl").out_dir
    with pytest.raises(InvalidDatasetError, match="--format datasets"):
        job(settings, dataset=str(other)).run()
    with pytest.raises(InvalidInputError, match="already has its rows and split"):
        FinetuneConfig("image-to-text", base=BASE, name="x", dataset=str(dataset), val_fraction=0.2)
    for bad in ({"lr": 0.0}, {"epochs": 0}, {"batch_size": 2.5}, {"only": "best"}):
        with pytest.raises(InvalidInputError):
            FinetuneConfig("image-to-text", base=BASE, name="x", **bad)
    assert listing(settings) == []


def test_a_name_is_taken_once_unless_overwritten(settings, feedback):
    dataset = feedback.split
    job(settings, dataset=str(dataset), max_steps=1).run()
    with pytest.raises(InvalidModelNameError, match="already exists"):
        job(settings, dataset=str(dataset), max_steps=1).run()
    (settings.models_dir / "not-ours").mkdir()
    with pytest.raises(InvalidModelNameError, match="not a fine-tuned model"):
        job(settings, "not-ours", dataset=str(dataset), max_steps=1, overwrite=True).run()
    assert job(settings, dataset=str(dataset), max_steps=2, overwrite=True).run().metrics["steps"] == 2


# --- nothing half-done is ever served ------------------------------------------------------------------


def test_a_cancelled_run_publishes_nothing(settings, feedback):
    dataset = feedback.split
    running = None

    def cancel_at_step_3(progress):
        if progress.step == 3:
            running.cancel()

    running = job(settings, dataset=str(dataset), on_progress=cancel_at_step_3)
    with pytest.raises(FinetuneCancelled):
        running.run()
    assert running.status is JobStatus.CANCELLED and running.progress.step == 3
    assert listing(settings) == []
    assert "blip-ft" not in open_registry(settings).catalog

    background = job(settings, "in-background", dataset=str(dataset))
    background.cancel()  # before it starts: it stops at its first step
    background.start()
    assert background.wait(60) is JobStatus.CANCELLED and "cancelled" in background.error
    assert listing(settings) == []
    finishing = job(settings, "in-background", dataset=str(dataset), max_steps=1)
    finishing.start()
    assert finishing.wait(60) is JobStatus.SUCCEEDED and finishing.result.name == "in-background"


def test_one_job_per_model_name_at_a_time(settings, feedback):
    from mmdemo.finetune.processes import name_lock as _name_lock

    settings.models_dir.mkdir(parents=True)
    with _name_lock(settings.models_dir, "blip-ft"):  # as if another job were training it
        with pytest.raises(InvalidModelNameError, match="right now"):
            job(settings, dataset=str(feedback.split), max_steps=1).run()
    assert job(settings, dataset=str(feedback.split), max_steps=1).run().name == "blip-ft"


def test_a_crash_while_saving_keeps_the_earlier_model_and_serves_no_half_checkpoint(settings, feedback, monkeypatch):
    dataset = feedback.split
    good = job(settings, dataset=str(dataset), max_steps=2).run()
    weights = (good.path / "model.safetensors").read_bytes()
    adapter = type(adapter_for("image-to-text"))

    def half_save(self, model, processor, folder):
        model.save_pretrained(folder)  # the weights are written, the processor never is
        raise OSError("disk full")

    monkeypatch.setattr(adapter, "save", half_save)
    for name, overwrite in (("blip-ft", True), ("fresh", False)):
        broken = job(settings, name, dataset=str(dataset), max_steps=2, overwrite=overwrite)
        with pytest.raises(OSError, match="disk full"):
            broken.run()
        assert broken.status is JobStatus.FAILED and "disk full" in broken.error
    assert listing(settings) == ["blip-ft"]
    assert (good.path / "model.safetensors").read_bytes() == weights
    assert [s.id for s in read_model_folders(settings.models_dir)] == ["blip-ft"]


def test_leftovers_of_a_killed_job_are_never_served_and_are_cleared(settings, feedback):
    dataset = feedback.split
    dead = settings.models_dir / ".killed.partial-999999999-0badc0de"  # no process has this pid
    dead.mkdir(parents=True)
    (dead / MODEL_ENTRY_FILE).write_text(json.dumps({"task": "image-to-text", "kind": "blip"}))
    assert "killed" not in task_catalog("tiny", None, settings.models_dir)
    job(settings, dataset=str(dataset), max_steps=1).run()
    assert listing(settings) == ["blip-ft"]


def test_model_folders_join_the_catalog_safely(tmp_path, caplog):
    models = tmp_path / "models"
    entry = {"task": "image-to-text", "kind": "blip", "params_m": 1.0}
    for name, content in (("good", entry), ("tiny-clip", entry), ("broken", "{not json"),
                          ("wrong-kind", {**entry, "kind": "clip"}), ("extra-keys", {**entry, "source": "/etc"})):
        (models / name).mkdir(parents=True)
        (models / name / MODEL_ENTRY_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
    (models / "no-entry").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / MODEL_ENTRY_FILE).write_text(json.dumps(entry))
    (models / "linked").symlink_to(outside, target_is_directory=True)
    catalog = task_catalog("tiny", None, models)
    assert catalog.get("good").source == f"local-dir:{(models / 'good').resolve()}"
    assert catalog.get("tiny-clip").kind == "clip"  # a folder never shadows a built-in model
    for skipped in ("broken", "wrong-kind", "extra-keys", "no-entry", "linked"):
        assert skipped not in catalog
    assert "skipped" in caplog.text
    assert [s.id for s in task_catalog("tiny", None, tmp_path / "none")] == [s.id for s in task_catalog("tiny")]


# --- a running app, the command line ---------------------------------------------------------------


def test_retraining_a_loaded_model_hot_swaps_it(settings, feedback):
    dataset = feedback.split
    job(settings, dataset=str(dataset), max_steps=1).run()
    registry = open_registry(settings)
    run(registry, "image-to-text", "blip-ft", image=picture(1), max_new_tokens=4)
    old = registry.call("blip-ft", lambda bundle: bundle.model)
    result = job(settings, dataset=str(dataset), max_steps=3, overwrite=True, registry=registry).run()
    assert result.swapped and registry.is_loaded("blip-ft")
    assert registry.call("blip-ft", lambda bundle: bundle.model) is not old
    assert registry.catalog.get("blip-ft").description == result.spec.description
    added = job(settings, "brand-new", dataset=str(dataset), max_steps=1, registry=registry).run()
    assert not added.swapped and "brand-new" in registry.catalog  # servable without a restart


def test_cli_finetune_then_models_lists_it(settings, feedback, capsys):
    dataset = feedback.split
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    code = main(["finetune", *common, "--task", "caption", "--base", BASE, "--name", "cli-ft",
                 "--dataset", str(dataset), "--epochs", "2", "--batch-size", "3", "--lr", "1e-3", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    printed = json.loads(out.out)
    assert printed["model"]["id"] == "cli-ft" and printed["metrics"]["steps"] == 4
    assert "epoch 2/2  step 4/4" in out.err
    assert main(["models", *common, "--task", "caption", "--json"]) == 0
    assert "cli-ft" in [m["id"] for m in json.loads(capsys.readouterr().out)]
    assert main(["finetune", *common, "--task", "caption", "--base", BASE, "--name", "../up"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main(["finetune", *common, "--task", "caption", "--base", "nope", "--name", "x"]) == 1
    assert listing(settings) == ["cli-ft"]


def test_the_finetune_command_needs_task_base_and_name_or_a_job_id(tmp_path, capsys):
    assert main(["finetune", "--profile", "tiny", "--data-dir", str(tmp_path), "--base", "tiny-blip-caption"]) == 2
    assert "mmdemo finetune needs --task, --name (or --job-id)." in capsys.readouterr().err


# --- LoRA ----------------------------------------------------------------------------------------------

LORA = dict(lora=True, lora_rank=2, lr=5e-2)  # tiny models are 32 wide: rank 2; LoRA needs a higher rate to move


def caption_logits(processor):
    """The BLIP caption logits of picture 0 with a fixed caption, for a model loaded as ``model``."""
    inputs = processor(images=picture(0), text="a red car", return_tensors="pt")
    return lambda model: model(**inputs).logits


def test_a_lora_job_publishes_only_an_adapter_that_the_registry_serves_on_the_base_copy(settings, feedback):
    import torch

    result = job(settings, "blip-lora", dataset=str(feedback.overfit), **LORA).run()
    files = set(os.listdir(result.path))
    assert ADAPTER_FILES <= files and not {"model.safetensors", "config.json"} & files
    adapter_bytes = (result.path / "adapter_model.safetensors").stat().st_size
    registry, loads = counting_registry(settings)
    base_folder = Path(registry.resolve_location(registry.catalog.get(BASE)))
    assert adapter_bytes < (base_folder / "model.safetensors").stat().st_size / 10
    metrics = result.metrics
    assert metrics["lora"]["merged"] is False and metrics["lora"]["targets"][:2] == ["qkv", "projection"]
    assert metrics["epochs"][-1]["train_loss"] < 0.99 * metrics["initial"]["train_loss"]  # it learnt
    entry = json.loads((result.path / MODEL_ENTRY_FILE).read_text())
    assert entry["adapter_of"] == BASE and entry["params_m"] == pytest.approx(metrics["lora"]["params_m"], abs=1e-3)

    # through the app: the base is loaded once, the adapter costs only its own bytes
    answer = run(registry, "image-to-text", "blip-lora", image=picture(0), max_new_tokens=12)
    assert answer["model"]["id"] == "blip-lora" and answer["text"]
    base_answer = run(registry, "image-to-text", BASE, image=picture(0), max_new_tokens=12)
    assert loads == [BASE]
    loaded = {m["id"]: m for m in registry.status()["loaded"]}
    assert set(loaded) == {BASE, "blip-lora"} and loaded["blip-lora"]["adapter_of"] == BASE
    assert loaded["blip-lora"]["memory_bytes"] < loaded[BASE]["memory_bytes"] / 10

    # the served adapter computes what peft computes, and not what the base computes
    _, processor = adapter_for("image-to-text").load(registry.catalog.get(BASE), str(base_folder),
                                                     Placement("cpu", "float32"))
    forward = caption_logits(processor)
    served = served_output(registry, "blip-lora", forward)
    with torch.inference_mode():
        expected = forward(peft_twin("image-to-text", registry.catalog.get(BASE), str(base_folder), result.path))
    assert torch.allclose(served, expected, atol=1e-5)
    assert not torch.allclose(served, served_output(registry, BASE, forward), atol=1e-3)
    assert base_answer == run(registry, "image-to-text", BASE, image=picture(0), max_new_tokens=12) | {
        "seconds": base_answer["seconds"]}

    # unloading the base takes its adapters with it; the adapter alone loads the base again
    assert registry.unload(BASE) and registry.status()["loaded"] == []
    assert run(registry, "image-to-text", "blip-lora", image=picture(0), max_new_tokens=12)["text"] == answer["text"]
    assert loads == [BASE, BASE]


def test_a_merged_lora_job_publishes_a_full_checkpoint_that_answers_as_the_adapter(settings, feedback):
    import torch

    job(settings, "blip-lora", dataset=str(feedback.overfit), **LORA).run()
    merged = job(settings, "blip-merged", dataset=str(feedback.overfit), merge=True, **{**LORA, "lora": None}).run()
    files = set(os.listdir(merged.path))
    assert "model.safetensors" in files and not ADAPTER_FILES & files
    assert "adapter_of" not in json.loads((merged.path / MODEL_ENTRY_FILE).read_text())
    assert merged.metrics["lora"]["merged"] is True
    registry = open_registry(settings)
    _, processor = adapter_for("image-to-text").load(registry.catalog.get(BASE),
                                                     registry.resolve_location(registry.catalog.get(BASE)),
                                                     Placement("cpu", "float32"))
    forward = caption_logits(processor)
    assert torch.allclose(served_output(registry, "blip-merged", forward),
                          served_output(registry, "blip-lora", forward), atol=1e-4)
    texts = [run(registry, "image-to-text", name, image=picture(i), max_new_tokens=12)["text"]
             for name in ("blip-merged", "blip-lora") for i in range(3)]
    assert texts[:3] == texts[3:]


def test_lora_settings_are_checked_before_training(settings, feedback):
    from mmdemo.finetune.lora import InvalidLoraTargetsError

    seen = []
    with pytest.raises(InvalidLoraTargetsError, match="nonexistent are not in 'tiny-blip-caption'.*qkv"):
        job(settings, "bad-lora", dataset=str(feedback.overfit), lora=True, lora_targets=("nonexistent",),
            on_progress=seen.append).run()
    assert listing(settings) == [] and not [p for p in seen if p.stage == "training"]
    with pytest.raises(InvalidInputError, match="needs LoRA training"):
        FinetuneConfig("image-to-text", base=BASE, name="x", lora=False, merge=True)
    with pytest.raises(InvalidInputError, match="LoRA rank"):
        FinetuneConfig("image-to-text", base=BASE, name="x", lora_rank=0)
    # the default: LoRA for large bases only
    assert not FinetuneConfig("image-to-text", base=BASE, name="x").uses_lora(0.3)
    assert FinetuneConfig("image-to-text", base=BASE, name="x").uses_lora(900.0)
    assert FinetuneConfig("image-to-text", base=BASE, name="x", lora=True).alpha == 16.0
    assert FinetuneConfig("image-to-text", base=BASE, name="x", lora_targets=("qkv",)).uses_lora(0.3)
    with pytest.raises(InvalidInputError, match="drop them or --no-lora"):
        FinetuneConfig("image-to-text", base=BASE, name="x", lora=False, lora_targets=("qkv",))


def test_cli_lora_options(settings, feedback, capsys):
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    code = main(["finetune", *common, "--task", "caption", "--base", BASE, "--name", "cli-lora",
                 "--dataset", str(feedback.overfit), "--max-steps", "1", "--batch-size", "3", "--lora",
                 "--lora-rank", "4", "--lora-alpha", "4", "--lora-targets", "qkv,query", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    saved = FinetuneConfig.load(settings.models_dir / "cli-lora" / RUN_CONFIG_FILE)
    assert (saved.lora, saved.lora_rank, saved.lora_alpha, saved.lora_targets) == (True, 4, 4.0, ("qkv", "query"))
    peft_config = json.loads((settings.models_dir / "cli-lora" / "adapter_config.json").read_text())
    assert peft_config["r"] == 4 and sorted(peft_config["target_modules"]) == ["qkv", "query"]
    assert main(["finetune", *common, "--task", "caption", "--base", BASE, "--name", "cli-bad",
                 "--dataset", str(feedback.overfit), "--lora-targets", "nonexistent"]) == 2  # bad input
    assert "nonexistent are not in" in capsys.readouterr().err
    assert listing(settings) == ["cli-lora"]


def test_a_lora_model_replacing_a_loaded_full_checkpoint_of_that_name_is_served_as_an_adapter(settings, feedback):
    registry = open_registry(settings)
    job(settings, "blip-ft", dataset=str(feedback.overfit), max_steps=1).run()
    registry.catalog.register(read_model_folders(settings.models_dir)[0])
    run(registry, "image-to-text", "blip-ft", image=picture(0), max_new_tokens=4)
    result = job(settings, "blip-ft", dataset=str(feedback.overfit), overwrite=True, registry=registry, **LORA).run()
    assert not result.swapped and result.serve_error is None and not registry.is_loaded("blip-ft")
    answer = run(registry, "image-to-text", "blip-ft", image=picture(0), max_new_tokens=4)
    loaded = {m["id"]: m for m in registry.status()["loaded"]}
    assert answer["model"]["id"] == "blip-ft" and loaded["blip-ft"]["adapter_of"] == BASE
