"""Fine-tuning text-to-image on the tiny Stable Diffusion: a LoRA on the UNet (or the whole UNet) trained on the
images people rated highly and on an image folder of one's own (image, caption) pairs; the LoRA saved in
diffusers' format (served on its base), merged, or a whole fine-tuned pipeline, each answering through the
registry; the validation loss, CLIP scores before/after and the validation grid in metrics.json; bad data
refused with the served model untouched."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmdemo.catalog import MODEL_ENTRY_FILE
from mmdemo.cli import main
from mmdemo.config import Settings
from mmdemo.feedback import FeedbackStore, export_dataset
from mmdemo.feedback.finetune_jobs import FinetuneJobStore
from mmdemo.errors import InvalidInputError
from mmdemo.finetune import METRICS_FILE, FinetuneConfig, InvalidDatasetError
from mmdemo.finetune.control import JobControl
from mmdemo.finetune.data import load_export
from mmdemo.finetune.evaluate import before_after
from mmdemo.finetune.text_to_image import GRID_FILE, LORA_WEIGHTS_FILE, TextToImageAdapter
from mmdemo.tasks import open_registry, run
from mmdemo.ui.finetune_panel import job_report

from colour_squares import COLOURS, square
from finetune_util import listing, make_job, settings_on, tiny_models_folder

TASK = "text-to-image"
BASE = "tiny-stable-diffusion"
FAST = dict(epochs=3, batch_size=4, lr=1e-3, seed=0)
SETTINGS = dict(steps=2, width=64, height=64, seed=7)  # what each test asks a model for


@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tiny_models_folder(tmp_path_factory, ["stable-diffusion", "clip"])


@pytest.fixture
def settings(tmp_path, tiny_models) -> Settings:
    return settings_on(tmp_path / "data", tiny_models)


def record_rated(store: FeedbackStore, registry, prompts: list[str], ratings: list[list[int | None]],
                 thumbs: int | None = None) -> None:
    """Each prompt made into two images through the task layer, recorded and rated."""
    for n, (prompt, rated) in enumerate(zip(prompts, ratings)):
        request = {"prompt": prompt, "num_images": 2, "steps": 2, "seed": n}
        result = run(registry, TASK, BASE, **request)
        output_id = store.record_result(TASK, request, result)
        store.add_feedback(output_id, annotator="alice", thumbs=thumbs,
                           correction={"image_ratings": rated, "preferred": None})


@pytest.fixture(scope="module")
def rated(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """16 prompts, each made into two images: one rated 5, the other 1 (a store, and its export)."""
    root = tmp_path_factory.mktemp("t2i-feedback")
    (root / "app").mkdir()
    (root / "app" / "tiny-models").symlink_to(tiny_models, target_is_directory=True)
    registry = open_registry(Settings(profile="tiny", data_dir=root / "app", device="cpu"))
    store = FeedbackStore(None, root / "store")
    prompts = [f"a {colour} square, picture {n}" for n in range(2) for colour in COLOURS]
    record_rated(store, registry, prompts, [[5, 1] if n % 2 else [1, 5] for n in range(len(prompts))])
    export = export_dataset(store, TASK, root / "export", val_fraction=0.25, seed=0).out_dir
    return SimpleNamespace(store=store, export=export, prompts=prompts)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """An image folder of one's own (image, caption) pairs: colour squares, metadata.jsonl (train) and a
    validation folder with metadata.csv."""
    root = tmp_path_factory.mktemp("pairs") / "squares"
    rng = random.Random(0)
    for split, count in (("train", 12), ("validation", 4)):
        (root / split).mkdir(parents=True)
        lines = []
        for n in range(count):
            colour = list(COLOURS)[n % len(COLOURS)]
            square(colour, rng).save(root / split / f"{colour}-{n}.png")
            lines.append({"file_name": f"{colour}-{n}.png", "text": f"a {colour} square"})
        if split == "train":
            (root / split / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        else:
            (root / split / "metadata.csv").write_text(
                "file_name,text\n" + "".join(f"{line['file_name']},{line['text']}\n" for line in lines))
    return root


def pixels(result: dict) -> np.ndarray:
    return np.asarray(result["images"][0], dtype=np.float32)


def test_the_export_keeps_ratings_and_preference_pairs_and_training_reads_the_ratings(rated):
    folders = sorted(p.name for p in rated.export.iterdir() if p.is_dir())
    assert folders == ["preferences", "ratings"]
    data = load_export(rated.export, TASK, TextToImageAdapter.columns)
    assert data.rows["train"] + data.rows["validation"] == 32  # two images per prompt
    kept = TextToImageAdapter().prepare_data(data)
    assert kept.rows["train"] + kept.rows["validation"] == 16 and set(kept.train["rating"]) == {5}
    assert "rated 4 or 5" in kept.source["rule"]


def test_a_lora_job_from_the_store_lowers_the_loss_and_saves_an_adapter_with_its_evaluation(settings, rated):
    registry = open_registry(settings)
    result = make_job(settings, TASK, BASE, "sd-lora", FAST, store=rated.store, val_fraction=0.25,
                      registry=registry).run()
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["epochs"][-1]["train_loss"] < metrics["initial"]["train_loss"]
    assert metrics["data"]["rows"]["train"] >= 8 and metrics["model_changes"]["trained"] == "lora"
    # the folder holds the LoRA alone, in diffusers' format, and its entry names its base
    assert (result.path / LORA_WEIGHTS_FILE).is_file() and not (result.path / "model_index.json").exists()
    entry = json.loads((result.path / MODEL_ENTRY_FILE).read_text())
    assert entry["adapter_of"] == BASE and result.spec.adapter_of == BASE
    # evaluation: CLIP score and validation loss of base and new, the grid of fixed-seed prompts
    evaluation = metrics["evaluation"]
    for side in ("base", "new"):
        assert 0 <= evaluation[side]["clip_score"] <= 100 and evaluation[side]["prompts"] >= 1
        assert evaluation[side]["val_loss"] > 0 and evaluation[side]["references"] >= 1
    assert evaluation["new"]["val_loss"] < evaluation["base"]["val_loss"]
    assert evaluation["grid"]["file"] == GRID_FILE and evaluation["grid"]["rows"] == ["base", "new"]
    grid = Image.open(result.path / GRID_FILE)
    assert grid.size == (64 * len(evaluation["grid"]["prompts"]), 128)
    assert not np.array_equal(np.asarray(grid)[:64], np.asarray(grid)[64:])  # the LoRA changed the images
    table = before_after(metrics, "sd-lora", TASK)
    assert table["headers"] == ["model", "CLIP score", "validation loss"]
    assert [row[0] for row in table["rows"]] == [f"{BASE} (base)", "sd-lora (new)"]
    # the Models panel shows that table for the finished job
    shown, _, curve = job_report({"state": "succeeded", "name": "sd-lora", "task": TASK,
                                  "result": {"metrics": metrics}})
    assert list(shown.value["headers"]) == table["headers"] and shown.visible and curve.visible
    assert shown.value["data"][1][1] == f"{evaluation['new']['clip_score']:.3f} ({evaluation['new']['prompts']})"


def test_a_merged_lora_is_a_whole_pipeline_that_answers_through_the_registry(settings, rated):
    registry = open_registry(settings)
    before = pixels(run(registry, TASK, BASE, prompt="a red square", **SETTINGS))
    result = make_job(settings, TASK, BASE, "sd-merged", FAST, dataset=str(rated.export), merge=True,
                      registry=registry).run()
    assert (result.path / "model_index.json").is_file() and not (result.path / LORA_WEIGHTS_FILE).exists()
    assert "adapter_of" not in json.loads((result.path / MODEL_ENTRY_FILE).read_text())
    served = open_registry(settings)  # a fresh app reads the new folder from the models directory
    after = pixels(run(served, TASK, "sd-merged", prompt="a red square", **SETTINGS))
    assert after.shape == before.shape == (64, 64, 3) and not np.array_equal(after, before)
    # the base is untouched
    assert np.array_equal(pixels(run(served, TASK, BASE, prompt="a red square", **SETTINGS)), before)
    # the merged model answers as the adapter on its base does (diffusers' load_lora_weights)
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["model_changes"]["lora"]["merged"] is True
    assert metrics["evaluation"]["new"]["val_loss"] < metrics["evaluation"]["base"]["val_loss"]


def test_full_fine_tuning_on_an_image_folder_saves_a_pipeline_that_answers(settings, pairs):
    registry = open_registry(settings)
    result = make_job(settings, TASK, BASE, "sd-full", dict(FAST, lr=1e-4), dataset=str(pairs), lora=False,
                      registry=registry).run()
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["data"]["rows"] == {"train": 12, "validation": 4}
    assert metrics["model_changes"]["trained"] == "unet"
    assert metrics["epochs"][-1]["train_loss"] < metrics["initial"]["train_loss"]
    assert metrics["best_val_loss"] < metrics["initial"]["val_loss"]
    assert (result.path / "model_index.json").is_file() and (result.path / GRID_FILE).is_file()
    answer = run(open_registry(settings), TASK, "sd-full", prompt="a blue square", **SETTINGS)
    assert answer["images"][0].size == (64, 64)


def test_the_lora_folder_is_served_on_its_base_through_the_registry(settings, rated):
    """Served by the registry's LoRA support (another branch): the adapter applied on the base's copy gives
    diffusers' own load_lora_weights result for the same seed."""
    result = make_job(settings, TASK, BASE, "sd-served", FAST, dataset=str(rated.export)).run()
    reference = open_registry(settings)
    reference.call(BASE, lambda bundle: bundle.pipeline.load_lora_weights(str(result.path)))
    expected = run(reference, TASK, BASE, prompt="a green square", **SETTINGS)
    base = run(open_registry(settings), TASK, BASE, prompt="a green square", **SETTINGS)
    assert not np.array_equal(pixels(expected), pixels(base))
    served = pixels(run(open_registry(settings), TASK, "sd-served", prompt="a green square", **SETTINGS))
    assert np.allclose(served, pixels(expected), atol=2)


def test_mmdemo_evaluate_scores_catalog_models_on_an_image_folder(settings, pairs, capsys):
    make_job(settings, TASK, BASE, "sd-eval", dict(FAST, epochs=1), dataset=str(pairs), merge=True).run()
    code = main(["evaluate", "--data-dir", str(settings.data_dir), "--profile", "tiny", "--device", "cpu",
                 "--task", "t2i", "--models", f"{BASE},sd-eval", "--dataset", str(pairs), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["questions"] == len(COLOURS)  # one per distinct caption
    for model in (BASE, "sd-eval"):
        assert 0 <= report["models"][model]["clip_score"] <= 100 and report["models"][model]["val_loss"] > 0


def test_no_highly_rated_image_fails_clearly_and_publishes_nothing(settings, tiny_models, tmp_path):
    registry = open_registry(settings)
    before = pixels(run(registry, TASK, BASE, prompt="a red square", **SETTINGS))
    store = FeedbackStore(None, tmp_path / "low")
    record_rated(store, registry, ["a red square", "a blue square"], [[2, 1], [3, None]], thumbs=-1)
    with pytest.raises(InvalidDatasetError, match="rated 4 or 5") as refused:
        make_job(settings, TASK, BASE, "sd-low", FAST, store=store, registry=registry).run()
    assert "None of the" in str(refused.value)
    # the app refuses it before queueing a job
    control = JobControl(settings, registry, lambda: store)
    with pytest.raises(InvalidDatasetError, match="None of the images of the 2 all text-to-image feedback records"):
        control.start(FinetuneConfig(TASK, base=BASE, name="sd-low", only="all"), "admin")
    assert FinetuneJobStore(store).list() == []
    assert listing(settings) == [] and "sd-low" not in registry.catalog
    assert np.array_equal(pixels(run(registry, TASK, BASE, prompt="a red square", **SETTINGS)), before)


def test_a_record_whose_image_is_missing_fails_clearly_and_publishes_nothing(settings, tmp_path):
    registry = open_registry(settings)
    store = FeedbackStore(None, tmp_path / "lost")
    record_rated(store, registry, ["a red square", "a blue square"], [[5, 1], [5, 4]])
    lost = next(p for p in (tmp_path / "lost" / "media").rglob("*.png"))
    lost.unlink()
    with pytest.raises(InvalidDatasetError, match="lost their media file"):
        make_job(settings, TASK, BASE, "sd-lost", FAST, store=store, registry=registry).run()
    assert listing(settings) == [] and "sd-lost" not in registry.catalog


def test_an_image_folder_naming_a_missing_image_is_refused(settings, pairs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    square("purple", random.Random(0)).save(broken / "red.png")
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": "a red square"}) + "\n"
                                           + json.dumps({"file_name": "gone.png", "text": "a blue square"}) + "\n")
    with pytest.raises(InvalidDatasetError, match="gone.png, which is not a file"):
        make_job(settings, TASK, BASE, "sd-broken", FAST, dataset=str(broken)).run()
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "../red.png", "text": "escape"}) + "\n")
    with pytest.raises(InvalidDatasetError, match="not a file in"):
        make_job(settings, TASK, BASE, "sd-broken", FAST, dataset=str(broken)).run()
    assert listing(settings) == []


def test_lora_target_modules_the_unet_lacks_are_refused(settings, pairs):
    with pytest.raises(InvalidInputError, match="LoRA target modules nonexistent do not fit this UNet"):
        make_job(settings, TASK, BASE, "sd-targets", FAST, dataset=str(pairs), lora_targets=["nonexistent"]).run()
    assert listing(settings) == []
