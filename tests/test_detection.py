"""Zero-shot object detection on the tiny OWL-ViT, OWLv2 and Grounding DINO: the runner, its refusals,
concurrency, the feedback schema (corrections) and the exported rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmdemo.errors import InvalidFeedbackError, InvalidImageError, InvalidInputError
from mmdemo.tasks import run
from mmdemo.tasks.detection import MAX_BOXES, MAX_QUERIES, DetectionSchema, model_view
from mmdemo.tasks.spec import task_spec
from test_task_concurrency import THREADS, check_concurrent_calls, pictures

TASK = "zero-shot-object-detection"
MODELS = ["tiny-owlvit", "tiny-owlv2", "tiny-grounding-dino"]


def photo(width: int, height: int, seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def inside(box: dict[str, float], width: int, height: int) -> bool:
    return 0 <= box["xmin"] < box["xmax"] <= width and 0 <= box["ymin"] < box["ymax"] <= height


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("size", [(90, 120), (300, 40)])  # portrait; a strip longer than 4:1 (padded)
def test_boxes_are_inside_the_image_sorted_and_labelled_with_queries(shared_registry, model_id, size):
    width, height = size
    result = run(shared_registry, TASK, model_id, image=photo(width, height), queries="cat, remote control",
                 threshold=0.05)
    assert (result["width"], result["height"]) == (width, height)
    boxes = result["boxes"]
    assert boxes, "the tiny models are tweaked to find some boxes above a low threshold"
    assert {item["label"] for item in boxes} <= {"cat", "remote control"}
    assert all(inside(item["box"], width, height) for item in boxes)
    scores = [item["score"] for item in boxes]
    assert scores == sorted(scores, reverse=True) and all(0.05 <= s <= 1 for s in scores)
    assert result["model"]["id"] == model_id


@pytest.mark.parametrize("model_id", MODELS)
def test_threshold_and_max_boxes_are_respected(shared_registry, model_id):
    image = photo(80, 64)
    everything = run(shared_registry, TASK, model_id, image=image, queries="cat, dog", threshold=0.0)["boxes"]
    median = float(np.median([item["score"] for item in everything]))
    above = run(shared_registry, TASK, model_id, image=image, queries="cat, dog", threshold=median)["boxes"]
    assert 0 < len(above) < len(everything)
    assert all(item["score"] >= median for item in above)
    assert above == [item for item in everything if item["score"] >= median]
    two = run(shared_registry, TASK, model_id, image=image, queries="cat, dog", threshold=0.0, max_boxes=2)["boxes"]
    assert two == everything[:2]


def test_the_catalog_default_threshold_applies(shared_registry):
    spec = shared_registry.catalog.get("tiny-owlvit")
    result = run(shared_registry, TASK, "tiny-owlvit", image=photo(64, 64), queries="cat")
    assert result["threshold"] == spec.defaults.get("threshold", 0.1)


def test_a_box_scores_its_best_query_whatever_the_batch(shared_registry):
    """Requests with other queries batched together give each the result it gets alone."""
    from mmdemo.tasks import run_batch

    requests = [dict(image=photo(64, 48, seed=i), queries=queries, threshold=0.0)
                for i, queries in enumerate(["cat", "cat, dog", "cat", "bus"])]
    alone = [run(shared_registry, TASK, "tiny-owlv2", **request)["boxes"] for request in requests]
    together = [result["boxes"] for result in run_batch(shared_registry, TASK, "tiny-owlv2", requests)]
    assert together == alone


@pytest.mark.parametrize(("inputs", "error", "field"), [
    (dict(queries=""), InvalidInputError, "queries"),
    (dict(queries=", ,"), InvalidInputError, "queries"),
    (dict(queries=", ".join(f"thing {i}" for i in range(MAX_QUERIES + 1))), InvalidInputError, "queries"),
    (dict(queries="cat\x00"), InvalidInputError, "queries"),
    (dict(queries="cat", threshold=1.5), InvalidInputError, "threshold"),
    (dict(queries="cat", threshold=float("nan")), InvalidInputError, "threshold"),
    (dict(queries="cat", threshold="high"), InvalidInputError, "threshold"),
    (dict(queries="cat", max_boxes=0), InvalidInputError, "max_boxes"),
    (dict(queries="cat", max_boxes=2.5), InvalidInputError, "max_boxes"),
    (dict(queries="cat", max_boxes=MAX_BOXES + 1), InvalidInputError, "max_boxes"),
    (dict(queries="cat", colour="red"), InvalidInputError, None),
])
def test_bad_input_is_refused_before_the_model_runs(shared_registry, inputs, error, field):
    from mmdemo.tasks import prepare

    with pytest.raises(error) as refused:
        prepare(shared_registry, TASK, "tiny-owlvit", dict(image=photo(32, 32), **inputs))
    if field is not None:
        assert refused.value.field == field
    assert "Traceback" not in str(refused.value) and str(refused.value)


def test_a_missing_or_broken_image_is_refused(shared_registry):
    from mmdemo.tasks import prepare

    with pytest.raises(InvalidImageError):
        prepare(shared_registry, TASK, None, dict(queries="cat"))
    with pytest.raises(InvalidImageError):
        prepare(shared_registry, TASK, None, dict(image=b"not an image", queries="cat"))


def test_model_view_pads_at_the_right_or_bottom_only():
    view, scale = model_view(photo(400, 50))
    assert view.size == (400, 100) and scale == 1.0
    assert np.array_equal(np.asarray(view)[:50], np.asarray(photo(400, 50)))  # the image stays at (0, 0)
    view, scale = model_view(photo(2666, 1000))
    assert max(view.size) == 1333 and math.isclose(scale, 0.5)


@pytest.mark.parametrize("model_id", MODELS)
def test_concurrent_calls_overlap_and_match_single_calls(shared_registry, model_id):
    query_sets = ["cat, dog", "car, bus, train", "cup", "sun, moon, star, sky"]
    requests = [dict(image=image, queries=queries, threshold=0.2 + 0.1 * i)
                for i, (image, queries) in enumerate(zip(pictures(), query_sets))]
    assert len(requests) == THREADS

    def forward(bundle):
        model = bundle.model
        return model.model.backbone if model_id == "tiny-grounding-dino" else model.owlvit.vision_model \
            if model_id == "tiny-owlvit" else model.owlv2.vision_model

    check_concurrent_calls(shared_registry, TASK, model_id, requests, forward)


def test_the_task_is_registered_with_its_models_and_builders():
    spec = task_spec("detect")
    assert spec.id == TASK and spec.api_name == "detect" and spec.tab == "mmdemo.ui.detection"
    assert {m.id for m in spec.tiny_models} == set(MODELS)
    assert {m.source.removeprefix("tiny:") for m in spec.tiny_models} == set(spec.tiny_builders)


# --- feedback ------------------------------------------------------------------------------------------

SCHEMA = DetectionSchema()
CAT = {"label": "cat", "box": {"xmin": 10, "ymin": 20, "xmax": 60, "ymax": 70}}


def test_a_correction_keeps_labels_and_corners_and_drops_scores():
    remote = {"label": "  remote   control ", "box": {"xmin": 0, "ymin": 0, "xmax": 5.25, "ymax": 9}}
    fixed = SCHEMA.clean_correction([{**CAT, "score": 0.4}, remote], 0)
    assert fixed == [CAT | {"box": {k: float(v) for k, v in CAT["box"].items()}},
                     {"label": "remote control", "box": {"xmin": 0.0, "ymin": 0.0, "xmax": 5.2, "ymax": 9.0}}]
    assert SCHEMA.clean_correction([], 0) == []  # nothing there: every box rejected


@pytest.mark.parametrize("correction", [
    "cat",
    {"label": "cat"},
    [{"box": CAT["box"]}],
    [{"label": "", "box": CAT["box"]}],
    [{"label": 3, "box": CAT["box"]}],
    [{"label": "cat", "box": {"xmin": 10, "ymin": 20, "xmax": 10, "ymax": 70}}],  # empty
    [{"label": "cat", "box": {"xmin": 60, "ymin": 20, "xmax": 10, "ymax": 70}}],  # inverted
    [{"label": "cat", "box": {"xmin": -1, "ymin": 20, "xmax": 10, "ymax": 70}}],
    [{"label": "cat", "box": {"xmin": 1, "ymin": 20, "xmax": float("inf"), "ymax": 70}}],
    [{"label": "cat", "box": {"xmin": 1, "ymin": 20, "xmax": "9", "ymax": 70}}],
    [{"label": "cat", "box": {"xmin": 1, "ymin": 20, "xmax": True, "ymax": 70}}],
    [{"label": "cat\x00", "box": CAT["box"]}],
    [{"label": "x" * 101, "box": CAT["box"]}],
    [CAT] * (MAX_BOXES + 1),
])
def test_a_bad_correction_is_refused_with_a_readable_message(correction):
    with pytest.raises(InvalidFeedbackError) as refused:
        SCHEMA.clean_correction(correction, 0)
    assert str(refused.value)


def test_correction_json_from_the_api():
    assert SCHEMA.parse_correction('[{"label": "cat", "box": {"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}}]')[0][
        "label"] == "cat"
    with pytest.raises(InvalidFeedbackError):
        SCHEMA.parse_correction("cat at the left")


def test_an_output_with_a_box_outside_its_image_is_refused():
    good = {"boxes": [{**CAT, "score": 0.5}], "width": 100, "height": 100, "threshold": 0.1}
    SCHEMA.check_output(good)
    with pytest.raises(InvalidInputError):
        SCHEMA.check_output({**good, "width": 50})


def test_a_corrected_box_outside_the_image_is_refused_by_the_store(store_on_each_database):
    """The store checks a correction against the recorded output's image size (the API and Annotate save
    through it), naming the box; the earlier correction stays."""
    store = store_on_each_database
    output = {"boxes": [{**CAT, "score": 0.5}], "width": 100, "height": 80, "threshold": 0.1}
    output_id = store.record_output(TASK, inputs={"image": photo(100, 80), "queries": ["cat", "dog"]}, output=output)
    inside = [{"label": "dog", "box": {"xmin": 0, "ymin": 0, "xmax": 100, "ymax": 80}}]  # the whole image
    saved = store.add_feedback(output_id, annotator="alice", correction=inside)
    outside = [*inside, {"label": "cat", "box": {"xmin": 50, "ymin": 10, "xmax": 120.5, "ymax": 40}}]
    with pytest.raises(InvalidFeedbackError, match=r"Box 2 \(cat, xmax 120.5, ymax 40\) reaches outside the "
                                                   r"100x80 image"):
        store.add_feedback(output_id, annotator="alice", correction=outside)
    assert store.get(saved.id).correction == [{"label": "dog", "box": {"xmin": 0.0, "ymin": 0.0,
                                                                               "xmax": 100.0, "ymax": 80.0}}]


def record(output: dict, correction=None) -> SimpleNamespace:
    out = SimpleNamespace(output=output, inputs={"queries": ["cat", "dog"]}, input_media=["sha256-abc"],
                          input_key="key")
    return SimpleNamespace(output=out, correction=correction)


def test_an_example_is_in_the_fine_tuning_guide_shape():
    """image, width, height, objects {id, area, bbox [x, y, w, h] (COCO), category}."""
    output = {"boxes": [{**CAT, "score": 0.9}], "width": 100, "height": 80, "threshold": 0.1}
    (example,) = SCHEMA.examples(record(output))
    assert example.config == "default" and example.media == {"image": "sha256-abc"}
    assert example.row == {"width": 100, "height": 80, "queries": ["cat", "dog"],
                           "objects": [{"id": 0, "area": 2500.0, "bbox": [10, 20, 50, 50], "category": "cat"}]}
    corrected = [{"label": "dog", "box": {"xmin": 0.0, "ymin": 0.0, "xmax": 30.5, "ymax": 10.0}}]
    (example,) = SCHEMA.examples(record(output, corrected))
    assert example.row["objects"] == [{"id": 0, "area": 305.0, "bbox": [0.0, 0.0, 30.5, 10.0], "category": "dog"}]
    assert set(example.row) | {"image"} == set(SCHEMA.configs()["default"])


# --- end to end: the API, feedback, Annotate, the CLI, export -----------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CAT_PHOTO = ROOT / "assets" / "cat.jpg"


def test_detect_through_the_api_then_correct_and_export_with_the_cli(tiny_app, tmp_path, capsys):
    import datasets
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import ValidationError

    from mmdemo.cli import main

    client = Client(tiny_app.url, verbose=False)
    photo_file = handle_file(str(CAT_PHOTO))
    table, footer, details = client.predict(photo_file, "cat, remote control", "tiny-owlvit", 0.05, 10,
                                            api_name="/detect")
    assert "tiny-owlvit" in footer and details["boxes"] and len(details["boxes"]) <= 10
    assert table["headers"] == ["label", "score", "xmin", "ymin", "xmax", "ymax"]
    assert [row[0] for row in table["data"]] == [item["label"] for item in details["boxes"]]
    with pytest.raises(ValidationError, match="threshold"):
        client.predict(photo_file, "cat", "tiny-owlvit", 2, 10, api_name="/detect")
    with pytest.raises(ValidationError, match="quer"):
        client.predict(photo_file, " , ", "tiny-owlvit", None, 10, api_name="/detect")

    tiny_app.flush_records()
    kept = details["boxes"][0]
    drawn = {"label": "tabby cat", "box": {"xmin": 5, "ymin": 6, "xmax": 105, "ymax": 86}}
    correction = json.dumps([{"label": kept["label"], "box": kept["box"]}, drawn])
    message, record_id = client.predict(details["output_id"], "down", correction, None, api_name="/feedback")
    assert message == f"Saved #{record_id}"
    with pytest.raises(Exception, match="(?i)box 1"):  # an empty box: refused, readable
        client.predict(details["output_id"], None, json.dumps([{"label": "cat", "box": {"xmin": 9, "ymin": 9,
                                                                                          "xmax": 9, "ymax": 20}}]),
                       None, api_name="/feedback")

    width, height = Image.open(CAT_PHOTO).size
    outside = {"label": "cat", "box": {"xmin": 10, "ymin": 10, "xmax": width + 5, "ymax": 20}}
    with pytest.raises(Exception, match=rf"Box 2 \(cat, xmax {width + 5}, ymax 20\) reaches outside the "
                                        rf"{width}x{height} image"):
        client.predict(details["output_id"], None, json.dumps([drawn, outside]), None, api_name="/feedback")

    out = tmp_path / "export"
    common = ["--profile", "tiny", "--data-dir", str(tiny_app.settings.data_dir)]
    assert main(["export", "--task", "detect", "--out", str(out), "--only", "corrected", *common]) == 0
    exported = [row for split in datasets.load_from_disk(str(out)).values() for row in split]
    ours = [row for row in exported if row["record_id"] == record_id]
    assert len(ours) == 1
    row = ours[0]
    width, height = Image.open(CAT_PHOTO).size
    assert (row["width"], row["height"]) == (width, height) and row["image"].size == (width, height)
    assert row["queries"] == ["cat", "remote control"]
    box = kept["box"]
    assert row["objects"] == [
        {"id": 0, "area": pytest.approx((box["xmax"] - box["xmin"]) * (box["ymax"] - box["ymin"]), abs=0.5),
         "bbox": pytest.approx([box["xmin"], box["ymin"], box["xmax"] - box["xmin"], box["ymax"] - box["ymin"]],
                               abs=0.1), "category": kept["label"]},
        {"id": 1, "area": 8000.0, "bbox": [5.0, 6.0, 100.0, 80.0], "category": "tabby cat"},
    ]


def test_predict_from_the_command_line(capsys, tiny_data_dir):
    from mmdemo.cli import main

    common = ["--profile", "tiny", "--data-dir", str(tiny_data_dir), "--device", "cpu"]
    assert main(["predict", "detect", "--input", str(CAT_PHOTO), "--queries", "cat, dog",
                 "--model", "tiny-grounding-dino", "--threshold", "0.2", "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["boxes"] and all(item["score"] >= 0.2 and item["label"] in ("cat", "dog") for item in result["boxes"])
    assert main(["predict", "detect", "--input", str(CAT_PHOTO), "--queries", "cat", *common]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[1] == "cat" and "-- tiny-owlv2" in printed  # score, label, corners


def test_an_annotator_corrects_boxes_through_annotate(login_app, login_store):
    import uuid

    from gradio_client import Client

    from mmdemo.feedback import AnnotationQueue

    tag = uuid.uuid4().hex[:6]
    output = {"boxes": [{**CAT_BOX, "score": 0.5}], "width": 64, "height": 48, "threshold": 0.1,
              "model": {"id": "tiny-owlv2", "revision": None, "backend": "transformers"}}
    output_id = login_store.record_output(TASK, inputs={"image": photo(64, 48), "queries": "cat, dog"}, output=output)
    queue = AnnotationQueue(login_store)
    campaign = queue.create_campaign(f"boxes-{tag}", TASK, instructions="Box every cat.")
    queue.add_outputs(campaign.id, [output_id])
    bob = Client(login_app.url, auth=("bob", "pw-bob"), verbose=False)
    (item,) = bob.predict(campaign.name, 5, api_name="/annotate_batch")
    assert item["suggestion"]["boxes"][0]["label"] == "cat"
    moved = [{"label": "dog", "box": {"xmin": 1, "ymin": 2, "xmax": 30, "ymax": 40}}]
    message, record_id = bob.predict(campaign.name, output_id, correction=json.dumps(moved),
                                     api_name="/annotate_submit")
    record = login_store.get(record_id)
    assert record.correction == [{"label": "dog", "box": {"xmin": 1.0, "ymin": 2.0, "xmax": 30.0, "ymax": 40.0}}]


CAT_BOX = {"label": "cat", "box": {"xmin": 10.4, "ymin": 20.0, "xmax": 60.0, "ymax": 40.0}}


def editor():
    import gradio as gr

    from mmdemo.ui.detection import BoxesCorrection

    with gr.Blocks():
        return BoxesCorrection()


def test_the_box_editor_reads_what_the_person_changed(tmp_path):
    """What the Detect tab and Annotate save from the editor: nothing for boxes left as found, the edited
    boxes otherwise; a box outside the image or without a label is refused with a readable message."""
    widgets = editor()
    result = {"boxes": [{**CAT_BOX, "score": 0.5}], "width": 64, "height": 48}
    picture = tmp_path / "p.png"
    photo(64, 48).save(picture)
    value, rows = widgets.fill({**result, "image": str(picture)})  # Annotate passes the input image
    assert value["boxes"] == [{"label": "cat", "color": value["boxes"][0]["color"], "xmin": 10, "ymin": 20,
                               "xmax": 60, "ymax": 40}]
    assert rows == [["cat", 10, 20, 60, 40]]
    assert widgets.fill(result) == [gr_skip(), gr_skip()]  # the Detect tab fills it from its input image
    assert widgets.read(result, [value, rows]) is None  # as found: no correction
    moved = {**value, "boxes": [{**value["boxes"][0], "xmin": 20, "xmax": 64}]}
    assert widgets.read(result, [moved, rows]) == [{"label": "cat", "box": {"xmin": 20.0, "ymin": 20.0,
                                                                              "xmax": 64.0, "ymax": 40.0}}]
    assert widgets.read(result, [{**value, "boxes": []}, []]) == []  # every box rejected
    with pytest.raises(InvalidFeedbackError, match="outside"):
        widgets.read(result, [{**value, "boxes": [{**value["boxes"][0], "xmax": 65}]}, rows])
    with pytest.raises(InvalidFeedbackError, match="label"):
        widgets.read(result, [{**value, "boxes": [{**value["boxes"][0], "label": ""}]}, rows])
    # The keyboard table drives the editor: complete rows only.
    typed = widgets.with_table(value, [["dog", 1, 2, 30, 40], ["cat", "", 3, 4, 5]])
    assert [(b["label"], b["xmin"], b["xmax"]) for b in typed["boxes"]] == [("dog", 1, 30)]


def gr_skip():
    import gradio as gr

    return gr.skip()
