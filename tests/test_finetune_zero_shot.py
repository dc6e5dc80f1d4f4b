"""Fine-tuning zero-shot classification on feedback, with a before/after evaluation: tiny CLIP (symmetric
InfoNCE) and tiny SigLIP (sigmoid loss) trained on people's labels of colour squares, multi-label records
included, published as catalog models that answer through the registry; top-1 accuracy and multi-label F1
of base and new model in metrics.json and from ``mmdemo evaluate``; bad data refused."""

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
from mmdemo.feedback import AnnotationQueue, FeedbackStore, NothingToExportError, export_dataset
from mmdemo.finetune import METRICS_FILE, FinetuneJob, InvalidDatasetError, adapter_for
from mmdemo.finetune.data import load_export
from mmdemo.finetune.evaluate import LabelledQuestion
from mmdemo.finetune.zero_shot import agreed_labels, zero_shot_metrics
from mmdemo.registry import ModelRegistry, Placement
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.tasks import run

from colour_squares import COLOURS, colour_of, square
from finetune_util import ADAPTER_FILES, counting_registry, listing, make_job, peft_twin, served_output, settings_on, tiny_models_folder

TASK = "zero-shot-image-classification"
CLIP, SIGLIP = "tiny-clip", "tiny-siglip"
LABELS = list(COLOURS)


@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tiny_models_folder(tmp_path_factory, ["clip", "siglip"])


@pytest.fixture
def settings(tmp_path, tiny_models) -> Settings:
    return settings_on(tmp_path / "data", tiny_models)


def record_labels(store: FeedbackStore, registry: ModelRegistry, labels: list[tuple[Image.Image, list[str]]],
                  model: str = CLIP, annotator: str = "alice") -> None:
    """Each picture classified through the task layer among the 8 colours, recorded, and its top label
    accepted when it is the one right label, else corrected."""
    for image, right in labels:
        request = {"image": image, "labels": LABELS, "template": "a {} square"}
        result = run(registry, TASK, model, **request)
        output_id = store.record_result(TASK, request, result)
        if right == [result["labels"][0]["label"]]:
            store.add_feedback(output_id, annotator=annotator, thumbs=1)
        else:
            store.add_feedback(output_id, annotator=annotator, thumbs=-1, correction=right)


@pytest.fixture(scope="module")
def colours(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """48 labelled pictures (6 per colour; 6 of them multi-label: the colour and "dark" for the navy and
    brown ones), exported; and a held-out export of 16 other pictures (another store)."""
    root = tmp_path_factory.mktemp("zs-feedback")
    (root / "app").mkdir()
    (root / "app" / "tiny-models").symlink_to(tiny_models, target_is_directory=True)
    registry = open_registry(Settings(profile="tiny", data_dir=root / "app", device="cpu"))
    rng = random.Random(1)

    def right(colour: str, n: int) -> list[str]:
        return [colour, "dark"] if colour in ("navy", "brown") and n % 2 else [colour]

    store = FeedbackStore(None, root / "app")
    record_labels(store, registry, [(square(c, rng), right(c, n)) for c in COLOURS for n in range(6)])
    held = FeedbackStore(None, root / "held")
    record_labels(held, registry, [(square(c, rng), right(c, n)) for c in COLOURS for n in range(2)],
                  annotator="bob")
    train = export_dataset(store, TASK, root / "train", val_fraction=0.0).out_dir
    heldout = export_dataset(held, TASK, root / "heldout", val_fraction=0.0).out_dir
    held.close()
    yield SimpleNamespace(store=store, registry=registry, train=train, heldout=heldout, root=root)
    store.close()


def job(settings: Settings, base: str = CLIP, name: str = "clip-ft", **options) -> FinetuneJob:
    return make_job(settings, TASK, base, name, dict(epochs=4, batch_size=8, lr=1e-3, seed=0), **options)



# --- the metric ------------------------------------------------------------------------------------------


def test_top1_accuracy_for_single_label_and_micro_f1_for_multi_label_images():
    image = Image.new("RGB", (8, 8))

    def labelled(*right: str) -> LabelledQuestion:
        return LabelledQuestion(image, "", right)

    scored = [(labelled("cat"), ["cat", "dog"]), (labelled("dog"), ["cat", "dog"]), (labelled("Cat"), ["cat"]),
              # multi-label: the top 2 against the 2 right ones; the top 3 against 3
              (labelled("cat", "dog"), ["cat", "car", "dog"]), (labelled("a", "b", "c"), ["a", "b", "c", "d"])]
    metrics = zero_shot_metrics(scored)
    assert metrics["top1_accuracy"] == pytest.approx(2 / 3, abs=1e-4) and metrics["single_label"] == 3
    assert metrics["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1), abs=1e-4) and metrics["multi_label"] == 2
    assert zero_shot_metrics([(labelled("cat"), ["cat"])])["f1"] is None  # no multi-label image
    # several people: the labels at least half of them gave
    assert agreed_labels([["cat"], ["cat", "pet"], ["dog"]]) == ("cat",)
    assert agreed_labels([["cat"], ["Cat", "pet"]]) == ("cat", "pet")


def test_a_multi_label_record_gives_several_positives(tiny_models, colours):
    adapter = adapter_for(TASK)
    spec = SimpleNamespace(kind="clip", source_scheme="local-dir", defaults={})
    model, processor = adapter.load(spec, str(tiny_models / "clip"), Placement("cpu", "float32"))
    rows = {"image": [square("navy", random.Random(0)), square("cyan", random.Random(0))],
            "labels": [["navy", "dark"], ["cyan"]], "candidate_labels": [LABELS, LABELS],
            "template": ["a {} square", None]}
    batch = adapter.collate(model, processor, rows, 40)
    texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert len(texts) == 8 + 1 + 8  # the 8 colours and "dark" in the record's template, the 8 in the default
    # navy (in both templates) and dark; cyan in both templates; every other text is a negative
    assert batch["targets"].sum(1).tolist() == [3.0, 2.0]
    positives = [t for t, hit in zip(texts, batch["targets"][0].tolist()) if hit]
    assert sorted(t.replace(" ", "") for t in positives) == ["adarksquare", "anavysquare", "aphotoofanavy."]
    assert adapter.loss(model, batch).item() > 0


# --- CLIP and SigLIP: short jobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("base,kind", [(CLIP, "clip"), (SIGLIP, "siglip")])
def test_a_short_job_lowers_the_loss_reports_both_metrics_and_answers_through_the_registry(settings, colours, base,
                                                                                          kind):
    name = f"{kind}-ft"
    result = job(settings, base, name, dataset=str(colours.train), eval_dataset=str(colours.heldout),
                 epochs=3).run()
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["epochs"][-1]["train_loss"] < metrics["initial"]["train_loss"]
    evaluation = metrics["evaluation"]
    assert evaluation["data"] == {"kind": "dataset", "dataset": str(colours.heldout.resolve()), "questions": 16,
                                  "answers": 18, "biased": False}
    for model in ("base", "new"):
        assert evaluation[model]["questions"] == 16
        assert evaluation[model]["single_label"] == 14 and evaluation[model]["multi_label"] == 2
        assert 0.0 <= evaluation[model]["top1_accuracy"] <= 1.0 and 0.0 <= evaluation[model]["f1"] <= 1.0
    assert f"{base} (base)" in result.describe() and "top-1 accuracy" in result.describe()
    registry = open_registry(settings)
    assert registry.catalog.get(name, TASK).kind == kind
    answer = run(registry, TASK, name, image=square("cyan", random.Random(5)), labels=LABELS)
    assert answer["model"]["id"] == name and sorted(item["label"] for item in answer["labels"]) == sorted(LABELS)


# --- honest evaluation --------------------------------------------------------------------------------------------


def test_the_validation_split_is_reported_as_biased_accepted_and_corrected_apart(settings, colours):
    result = job(settings, store=colours.store, val_fraction=0.5, seed=3, max_steps=2).run()
    evaluation = result.metrics["evaluation"]
    assert evaluation["data"]["kind"] == "validation split" and evaluation["data"]["biased"] is True
    base = evaluation["base"]
    # corrected rows are where the base's top label was wrong; accepted ones copy it
    assert base["corrected"]["top1_accuracy"] == 0.0 and base["corrected"]["single_label"] >= 1
    if base.get("accepted", {}).get("single_label"):
        assert base["accepted"]["top1_accuracy"] == 1.0
    assert base["questions"] == sum(base[g]["questions"] for g in ("accepted", "corrected") if g in base)
    assert set(evaluation["new"]) == set(base)
    assert "biased" in result.describe() and "top-1 accuracy, corrected" in result.describe()


def test_evaluate_scores_catalog_models_on_a_dataset_and_a_campaign(settings, colours, capsys):
    trained = job(settings, dataset=str(colours.train), eval_dataset=str(colours.heldout), max_steps=3).run()
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    assert main(["evaluate", *common, "--task", "zero-shot", "--models", f"{CLIP},clip-ft",
                 "--dataset", str(colours.heldout), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    evaluation = trained.metrics["evaluation"]
    assert printed["models"]["clip-ft"] == evaluation["new"] and printed["models"][CLIP] == evaluation["base"]

    # a campaign labelled by two people: one accepts the suggestion of an item, the labels agreed are scored
    rng = random.Random(9)
    folder = settings.data_dir / "held-out-pictures"
    folder.mkdir()
    for n, colour in enumerate(COLOURS):
        square(colour, rng).save(folder / f"{n:02d}.png")
    with FeedbackStore.from_settings(settings) as store:
        queue = AnnotationQueue(store)
        queue.create_campaign("held-out", TASK, labels_per_item=2, model=CLIP)
        queue.import_folder("held-out", folder, open_registry(settings), inputs={"labels": LABELS})
        for annotator in ("carol", "dave"):
            for n, item in enumerate(queue.next_batch("held-out", annotator, 20)):
                if annotator == "dave" and n == 0:
                    queue.submit("held-out", item.output_id, annotator)  # accepts CLIP's top label
                else:
                    picture = Image.open(store.media_path(item.output.input_media[0]))
                    queue.submit("held-out", item.output_id, annotator, correction=[colour_of(picture)])
    assert main(["evaluate", *common, "--task", "zero-shot", "--models", f"{CLIP},clip-ft",
                 "--campaign", "held-out", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["questions"] == 8 and printed["data"]["answers"] in (8, 9)  # 9 if dave disagreed
    assert printed["data"]["biased"] is True and printed["data"]["accepted_suggestions"] == {CLIP: 1}
    assert printed["models"][CLIP]["questions"] == 8
    assert main(["evaluate", *common, "--task", "zero-shot", "--models", "clip-ft",
                 "--dataset", str(colours.heldout)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["model", "top-1", "accuracy"] and "clip-ft" in table


# --- bad data --------------------------------------------------------------------------------------------------


def test_bad_data_fails_clearly_and_leaves_the_served_model_alone(settings, colours, tmp_path):
    empty = FeedbackStore(None, tmp_path / "empty")
    with pytest.raises(NothingToExportError, match="No approved feedback on zero-shot-image-classification"):
        job(settings, store=empty).run()
    empty.close()
    assert listing(settings) == []

    served = job(settings, dataset=str(colours.train), max_steps=1).run()
    weights = (served.path / "model.safetensors").read_bytes()
    # a template without the label's place
    broken = tmp_path / "broken"
    splits = datasets.load_from_disk(str(colours.train))
    splits.map(lambda row: {"template": "a square"}).save_to_disk(str(broken))
    shutil.copy(colours.train / ".mmdemo-export", broken / ".mmdemo-export")
    with pytest.raises(InvalidDatasetError, match="Row 0 of the train split has the template 'a square'"):
        job(settings, dataset=str(broken), overwrite=True).run()
    # an export without the template column (made before it was exported)
    splits.remove_columns("template").save_to_disk(str(tmp_path / "old"))
    shutil.copy(colours.train / ".mmdemo-export", tmp_path / "old" / ".mmdemo-export")
    with pytest.raises(InvalidDatasetError, match="lacks the column"):
        job(settings, dataset=str(tmp_path / "old"), overwrite=True).run()
    # a record whose picture is gone
    with FeedbackStore.from_settings(settings) as store:
        record_labels(store, open_registry(settings),
                      [(square(c, random.Random(4)), [c]) for c in COLOURS])
        store.media_path(store.get(3).output.input_media[0]).unlink()
        with pytest.raises(InvalidDatasetError, match="1 of the 8 .* lost their media file"):
            job(settings, store=store, overwrite=True).run()
    assert listing(settings) == ["clip-ft"] and (served.path / "model.safetensors").read_bytes() == weights
    assert adapter_for(TASK).kinds == {"clip", "siglip"}
    load_export(colours.train, TASK, adapter_for(TASK).columns)  # the export has every column the adapter reads


# --- LoRA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,kind", [(CLIP, "clip"), (SIGLIP, "siglip")])
def test_a_lora_job_is_served_on_the_base_copy_as_peft_computes_it(settings, colours, base, kind):
    import torch

    name = f"{kind}-lora"
    result = job(settings, base, name, dataset=str(colours.train), eval_dataset=str(colours.heldout), epochs=3,
                 lr=1e-2, lora=True, lora_rank=2).run()
    assert {p.name for p in result.path.iterdir()} >= ADAPTER_FILES and result.spec.adapter_of == base
    assert not (result.path / "model.safetensors").exists()
    assert result.metrics["epochs"][-1]["train_loss"] < result.metrics["initial"]["train_loss"]
    registry, loads = counting_registry(settings)
    scoring = adapter_for(TASK).evaluation
    questions = scoring.examples_from_export(colours.heldout)
    assert result.metrics["evaluation"]["new"] == scoring.score(scoring.served_model_answers(registry, name), questions)
    processor = registry.call(base, lambda bundle: bundle.processor)
    inputs = processor(images=[square(c, random.Random(3)) for c in LABELS[:3]], text=LABELS,
                       padding="max_length" if kind == "siglip" else True, return_tensors="pt")
    forward = lambda model: model(**inputs).logits_per_image  # noqa: E731
    served = served_output(registry, name, forward)
    spec = registry.catalog.get(base)
    with torch.inference_mode():
        expected = forward(peft_twin(TASK, spec, registry.resolve_location(spec), result.path))
    assert torch.allclose(served, expected, atol=1e-4)
    assert not torch.allclose(served, served_output(registry, base, forward), atol=1e-3)
    answer = run(registry, TASK, name, image=square("cyan", random.Random(5)), labels=LABELS)
    assert answer["model"]["id"] == name and sorted(item["label"] for item in answer["labels"]) == sorted(LABELS)
    assert loads == [base]
