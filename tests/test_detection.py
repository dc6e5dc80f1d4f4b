"""Zero-shot object detection on the tiny OWL-ViT, OWLv2 and Grounding DINO: the runner, its refusals,
concurrency, the feedback schema (corrections) and the exported rows."""

from __future__ import annotations

import math
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
    assert spec.id == TASK and spec.api_name == "detect" and spec.tab == "mmdemo.ui.detect"
    assert {m.id for m in spec.tiny_models} == set(MODELS)
    assert {m.source.removeprefix("tiny:") for m in spec.tiny_models} == set(spec.tiny_builders)


# --- feedback ------------------------------------------------------------------------------------------

SCHEMA = DetectionSchema()
CAT = {"label": "cat", "box": {"xmin": 10, "ymin": 20, "xmax": 60, "ymax": 70}}


def test_a_correction_keeps_labels_and_corners_and_drops_scores():
    fixed = SCHEMA.clean_correction([{**CAT, "score": 0.4}, {"label": "  remote   control ",
                                                              "box": {"xmin": 0, "ymin": 0, "xmax": 5.25, "ymax": 9}}], 0)
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
