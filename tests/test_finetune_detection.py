"""Fine-tuning zero-shot object detection on people's boxes: tiny OWL-ViT, OWLv2 and Grounding DINO trained with
the DETR set loss on corrections recorded in a store, published as catalog models that answer through the
registry; mAP@0.5 of base and new model in metrics.json and from ``mmdemo evaluate``; bad data refused."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

from mmdemo.cli import main
from mmdemo.config import Settings
from mmdemo.feedback import FeedbackStore, NothingToExportError, export_dataset
from mmdemo.finetune import METRICS_FILE, FinetuneJob, InvalidDatasetError, adapter_for
from mmdemo.finetune.data import load_export
from mmdemo.finetune.detection import average_precision, box_iou, mean_average_precision
from mmdemo.registry import Placement
from mmdemo.tasks import open_registry, run
from mmdemo.tasks.detection import model_frame, model_view, pixel_box, relative_box

from finetune_util import listing, make_job, settings_on, tiny_models_folder

TASK = "zero-shot-object-detection"
OWLVIT = "tiny-owlvit"
COLOURS = {"red square": (200, 0, 0), "blue square": (0, 0, 200)}
QUERIES = "red square, blue square"


@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tiny_models_folder(tmp_path_factory, ["owlvit", "owlv2", "grounding-dino"])


@pytest.fixture
def settings(tmp_path, tiny_models) -> Settings:
    return settings_on(tmp_path / "data", tiny_models)


def scene(rng: random.Random) -> tuple[Image.Image, list[dict]]:
    """A 64x48 picture with one or two coloured squares, and their boxes as a person would draw them."""
    image = Image.new("RGB", (64, 48), (235, 235, 235))
    boxes = []
    for label in rng.sample(list(COLOURS), rng.choice([1, 2])):
        side = rng.randint(10, 20)
        x, y = rng.randint(0, 64 - side), rng.randint(0, 48 - side)
        image.paste(COLOURS[label], (x, y, x + side, y + side))
        boxes.append({"label": label, "box": {"xmin": x, "ymin": y, "xmax": x + side, "ymax": y + side}})
    return image, boxes


def record_boxes(store: FeedbackStore, registry, count: int, seed: int, annotator: str = "alice") -> None:
    """``count`` pictures run through the task layer, recorded, and their boxes corrected by a person."""
    rng = random.Random(seed)
    for _ in range(count):
        image, boxes = scene(rng)
        request = {"image": image, "queries": QUERIES}
        output_id = store.record_result(TASK, request, run(registry, TASK, OWLVIT, **request))
        store.add_feedback(output_id, annotator=annotator, thumbs=-1, correction=boxes)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """16 labelled pictures in a store, exported; and a held-out export of 8 others (another store)."""
    root = tmp_path_factory.mktemp("detection-feedback")
    (root / "app").mkdir()
    (root / "app" / "tiny-models").symlink_to(tiny_models, target_is_directory=True)
    registry = open_registry(Settings(profile="tiny", data_dir=root / "app", device="cpu"))
    store = FeedbackStore(None, root / "app")
    record_boxes(store, registry, 16, seed=1)
    held = FeedbackStore(None, root / "held")
    record_boxes(held, registry, 8, seed=2, annotator="bob")
    train = export_dataset(store, TASK, root / "train", val_fraction=0.0).out_dir
    heldout = export_dataset(held, TASK, root / "heldout", val_fraction=0.0).out_dir
    held.close()
    yield SimpleNamespace(store=store, train=train, heldout=heldout)
    store.close()


def job(settings: Settings, base: str = OWLVIT, name: str = "owlvit-ft", **options) -> FinetuneJob:
    return make_job(settings, TASK, base, name, dict(epochs=3, batch_size=4, lr=1e-3, seed=0), **options)


# --- mAP@0.5 -------------------------------------------------------------------------------------------------


def test_iou_and_average_precision_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)  # overlap 5x10, union 150
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0                      # touching edges only
    # hits T F T against 2 boxes: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; the envelope lifts the
    # precision at recall 1/2 to 1 (its own), then 2/3 for the last half: 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert average_precision([True, False, True], 2) == pytest.approx(5 / 6)
    assert average_precision([False, True], 1) == pytest.approx(1 / 2)  # a miss ranked first halves it
    assert average_precision([], 3) == 0.0


def test_mean_average_precision_by_hand():
    cat, dog = (0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 40.0, 30.0)
    # perfect boxes on two images: 1.0
    perfect = mean_average_precision([((("cat", cat),), [("cat", 0.9, cat)]),
                                      ((("dog", dog),), [("Dog", 0.3, dog)])])  # categories ignore case
    assert perfect["map50"] == 1.0 and perfect["categories"] == 2 and perfect["images"] == 2
    # a miss: one of two cats found (AP 1/2); the dog found (AP 1): mAP 3/4
    missed = mean_average_precision([((("cat", cat), ("dog", dog)), [("cat", 0.9, cat), ("dog", 0.8, dog)]),
                                     ((("cat", cat),), [])])
    assert missed["ap_per_category"] == {"cat": 0.5, "dog": 1.0} and missed["map50"] == 0.75
    # a duplicate: the same cat found twice before the second cat; the second box on it is a false positive:
    # hits T F T over 2 cats -> 5/6 (see above)
    other, again = (30.0, 0.0, 40.0, 10.0), (0.0, 0.0, 10.0, 9.0)  # again: IoU 0.9 with the first cat
    duplicate = mean_average_precision([((("cat", cat), ("cat", other)),
                                         [("cat", 0.9, cat), ("cat", 0.8, again), ("cat", 0.7, other)])])
    assert duplicate["map50"] == pytest.approx(5 / 6, abs=1e-4)
    # IoU 1/2 is a hit, below it a miss; a category nobody labelled (the car) does not count
    half = (0.0, 0.0, 10.0, 20.0)  # overlaps the cat 100 / 200
    assert mean_average_precision([((("cat", cat),), [("cat", 0.5, half), ("car", 0.9, cat)])])["map50"] == 1.0
    assert mean_average_precision([((("cat", cat),), [("cat", 0.5, (0.0, 0.0, 10.0, 21.0))])])["map50"] == 0.0
    assert mean_average_precision([((), [("cat", 0.5, cat)])])["map50"] is None  # no labelled box at all


def test_boxes_convert_to_the_models_relative_boxes_and_back():
    for kind in ("owlvit", "owlv2", "grounding-dino"):
        for size in ((64, 48), (300, 40), (2000, 1500)):  # a strip padded to 4:1; a picture shrunk to 1333
            view, scale = model_view(Image.new("RGB", size))
            frame = model_frame(kind, view)
            corners = {"xmin": 10.0, "ymin": 5.0, "xmax": 30.0, "ymax": 35.0}
            relative = relative_box(corners, frame, scale)
            assert all(0 < v < 1 for v in relative)
            back = pixel_box(list(relative), frame, scale, size)
            assert back == pytest.approx(corners, abs=0.11), (kind, size)


# --- short jobs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,kind", [(OWLVIT, "owlvit"), ("tiny-owlv2", "owlv2"),
                                       ("tiny-grounding-dino", "grounding-dino")])
def test_a_short_job_lowers_the_loss_reports_map_and_answers_through_the_registry(settings, scenes, base, kind):
    name = f"{kind}-ft"
    result = job(settings, base, name, dataset=str(scenes.train), eval_dataset=str(scenes.heldout)).run()
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["epochs"][-1]["train_loss"] < 0.7 * metrics["initial"]["train_loss"]
    evaluation = metrics["evaluation"]
    assert evaluation["data"] == {"kind": "dataset", "dataset": str(scenes.heldout.resolve()), "questions": 8,
                                  "answers": 8, "biased": False}
    for model in ("base", "new"):
        assert evaluation[model]["images"] == 8 and evaluation[model]["categories"] == 2
        assert 0.0 <= evaluation[model]["map50"] <= 1.0
        assert set(evaluation[model]["ap_per_category"]) == {"red square", "blue square"}
    assert f"{base} (base)" in result.describe() and "mAP@0.5" in result.describe()
    registry = open_registry(settings)
    assert registry.catalog.get(name, TASK).kind == kind
    answer = run(registry, TASK, name, image=scene(random.Random(5))[0], queries=QUERIES, threshold=0.0)
    assert answer["model"]["id"] == name and answer["boxes"]
    assert {item["label"] for item in answer["boxes"]} <= set(COLOURS)


def test_a_job_on_the_stores_boxes_learns_them_and_evaluate_prints_the_same_map(settings, scenes, capsys):
    """From the store (corrections as people saved them), a longer run: the boxes are learnt (the training
    loss falls by more than half, the training images' mAP rises); ``mmdemo evaluate`` scores the same."""
    result = job(settings, store=scenes.store, val_fraction=0.0, epochs=12, lr=2e-3,
                 eval_dataset=str(scenes.train)).run()
    metrics = result.metrics
    assert metrics["data"]["rows"] == {"train": 16, "validation": 0}
    assert metrics["epochs"][-1]["train_loss"] < 0.5 * metrics["initial"]["train_loss"]
    assert metrics["evaluation"]["new"]["map50"] > metrics["evaluation"]["base"]["map50"]
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    assert main(["evaluate", *common, "--task", "detection", "--models", f"{OWLVIT},owlvit-ft",
                 "--dataset", str(scenes.train), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"]["owlvit-ft"] == metrics["evaluation"]["new"]
    assert printed["models"][OWLVIT] == metrics["evaluation"]["base"]
    assert main(["evaluate", *common, "--task", "detection", "--models", "owlvit-ft",
                 "--dataset", str(scenes.train)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["model", "mAP@0.5"] and "owlvit-ft" in table


def test_an_images_boxes_become_positives_of_its_own_queries(tiny_models, scenes):
    adapter = adapter_for(TASK)
    spec = SimpleNamespace(kind="owlv2", source_scheme="local-dir", defaults={})
    model, processor = adapter.load(spec, str(tiny_models / "owlv2"), Placement("cpu", "float32"))
    image = Image.new("RGB", (80, 40), "white")
    rows = {"image": [image, image],
            "objects": [[{"id": 0, "area": 200.0, "bbox": [10.0, 20.0, 20.0, 10.0], "category": "cat"}], []],
            # a category a person typed that was not asked becomes a query of its row
            "queries": [["dog"], ["dog", "bird", "fish"]]}
    batch = adapter.collate(model, processor, rows, 40)
    assert batch["queries_per_image"] == [2, 3]
    first = batch["targets"][0]
    assert first["class_labels"].tolist() == [1]  # "cat", after "dog"
    # OWLv2 sees the 80x40 picture padded to an 80x80 square: the box is relative to the square
    assert first["boxes"].tolist()[0] == pytest.approx([20 / 80, 25 / 80, 20 / 80, 10 / 80])
    assert batch["targets"][1]["boxes"].shape == (0, 4)  # nothing there: only negatives
    assert adapter.loss(model, batch).item() > 0


# --- bad data ------------------------------------------------------------------------------------------------


def test_bad_data_fails_clearly_and_leaves_the_served_model_alone(settings, scenes, tmp_path):
    empty = FeedbackStore(None, tmp_path / "empty")
    with pytest.raises(NothingToExportError, match=f"No approved feedback on {TASK}"):
        job(settings, store=empty).run()
    empty.close()
    assert listing(settings) == []

    served = job(settings, dataset=str(scenes.train), max_steps=1).run()
    weights = (served.path / "model.safetensors").read_bytes()
    # a box reaching outside its 64x48 image (a dataset edited by hand)
    broken = tmp_path / "broken"
    splits = datasets.load_from_disk(str(scenes.train))
    first = splits["train"][0]["objects"][0]

    def widen(row, index):
        if index == 0:
            row["objects"][0]["bbox"] = [50.0, 10.0, 30.0, 10.0]
        return row

    splits.map(widen, with_indices=True).save_to_disk(str(broken))
    shutil.copy(scenes.train / ".mmdemo-export", broken / ".mmdemo-export")
    refusal = (rf"Row 0 of the train split: box 1 \({first['category']}, bbox .*\[50.0, 10.0, 30.0, 10.0\]\) "
               r"does not lie inside its 64x48 image")
    with pytest.raises(InvalidDatasetError, match=refusal):
        job(settings, dataset=str(broken), overwrite=True).run()
    assert listing(settings) == ["owlvit-ft"] and (served.path / "model.safetensors").read_bytes() == weights
    load_export(scenes.train, TASK, adapter_for(TASK).columns)  # the export has every column the adapter reads
