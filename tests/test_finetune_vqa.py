"""Fine-tuning visual question answering on feedback, with a before/after evaluation: tiny ViLT (its answer
head extended with new answers, or the job refused) and tiny BLIP VQA trained on people's corrections,
published as catalog models that answer through the registry and the app; VQA accuracy of base and new
model in metrics.json and from ``mmdemo evaluate``; and a tiny ViLT that learns 8 colours it cannot know,
end to end through the API, the store, the ``mmdemo finetune`` command and ``/vqa``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mmdemo.cli import main
from mmdemo.config import Settings
from mmdemo.errors import InvalidInputError
from mmdemo.feedback import AnnotationQueue, FeedbackStore, NothingToExportError, export_dataset
from mmdemo.finetune import METRICS_FILE, FinetuneConfig, FinetuneJob, InvalidDatasetError, adapter_for
from mmdemo.finetune.data import load_export
from mmdemo.finetune.evaluate import BIASED_NOTE, before_after, loss_curve
from mmdemo.finetune.vqa import normalize_answer, soft_scores, vqa_accuracy
from mmdemo.registry import ModelRegistry, Placement
from mmdemo.tasks import open_registry  # noqa: E402
from mmdemo.tasks import run
from mmdemo.tiny.common import VQA_ANSWERS

from colour_squares import COLOURS, QUESTION, colour_of, square
from finetune_util import ADAPTER_FILES, counting_registry, listing, make_job, peft_twin, served_output, settings_on, tiny_models_folder

TASK = "visual-question-answering"
VILT, BLIP = "tiny-vilt-vqa", "tiny-blip-vqa"
@pytest.fixture(scope="module", autouse=True)
def one_thread(torch_one_thread):
    """Tiny models train several times faster on one thread than on two shared cores."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tiny_models_folder(tmp_path_factory, ["vilt-vqa", "blip-vqa"])


@pytest.fixture
def settings(tmp_path, tiny_models) -> Settings:
    return settings_on(tmp_path / "data", tiny_models)


def record_corrections(store: FeedbackStore, registry: ModelRegistry, labels: list[tuple[Image.Image, str]],
                       model: str = VILT, annotator: str = "alice") -> list[str]:
    """Each picture asked about through the task layer, recorded, and its answer corrected (or accepted)."""
    output_ids = []
    for image, answer in labels:
        result = run(registry, TASK, model, image=image, question=QUESTION)
        output_id = store.record_result(TASK, {"image": image, "question": QUESTION}, result)
        if answer == result["answer"]:
            store.add_feedback(output_id, annotator=annotator, thumbs=1)
        else:
            store.add_feedback(output_id, annotator=annotator, thumbs=-1, correction=answer)
        output_ids.append(output_id)
    return output_ids


@pytest.fixture(scope="module")
def colours(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """32 corrected answers (the 8 colours, 4 pictures each) plus 4 answers ViLT knows, exported; and a
    held-out export of 16 other pictures (another store: data the base model never saw corrected)."""
    root = tmp_path_factory.mktemp("vqa-feedback")
    (root / "app").mkdir()
    (root / "app" / "tiny-models").symlink_to(tiny_models, target_is_directory=True)
    registry = open_registry(Settings(profile="tiny", data_dir=root / "app", device="cpu"))
    rng = random.Random(1)
    store = FeedbackStore(None, root / "app")
    labels = [(square(c, rng), c) for c in COLOURS for _ in range(4)] + [(square("navy", rng), "blue")] * 2
    record_corrections(store, registry, labels)
    held = FeedbackStore(None, root / "held")
    record_corrections(held, registry, [(square(c, rng), c) for c in COLOURS for _ in range(2)], annotator="bob")
    train = export_dataset(store, TASK, root / "train", val_fraction=0.0).out_dir
    heldout = export_dataset(held, TASK, root / "heldout", val_fraction=0.0).out_dir
    held.close()
    yield SimpleNamespace(store=store, registry=registry, train=train, heldout=heldout, root=root)
    store.close()


def job(settings: Settings, base: str = VILT, name: str = "vilt-ft", **options) -> FinetuneJob:
    return make_job(settings, TASK, base, name, dict(epochs=4, batch_size=8, lr=1e-3, seed=0), **options)



# --- the metric ------------------------------------------------------------------------------------------


def test_vqa_accuracy_normalises_answers_and_counts_people():
    assert normalize_answer("  The Two dogs. ") == "2 dogs" and normalize_answer("yes!") == "yes"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("an apple, red") == "apple red"
    assert vqa_accuracy("Two", ["2"]) == 1.0 and vqa_accuracy("two", ["3"]) == 0.0  # one answer: exact match
    several = ["red", "red", "dark red", "red", "maroon"]
    assert vqa_accuracy("red", several) == 1.0  # 3 of them said it
    assert vqa_accuracy("dark red", several) == pytest.approx(1 / 3) and vqa_accuracy("blue", several) == 0.0


def test_a_jobs_metrics_become_before_after_rows_and_loss_points():
    """The Models panel's table and loss curve, from a VQA job's metrics.json (as FinetuneJob writes it)."""
    metrics = {
        "base": {"id": "tiny-vilt-vqa"},
        "initial": {"train_loss": 0.9, "val_loss": 0.8},
        "epochs": [{"epoch": 1, "steps": 2, "train_loss": 0.5, "val_loss": 0.6},
                   {"epoch": 2, "steps": 2, "train_loss": 0.25, "val_loss": None}],
        "evaluation": {
            "data": {"kind": "validation split", "questions": 3, "biased": True, "note": BIASED_NOTE},
            "base": {"vqa_accuracy": 0.3333, "questions": 3, "accepted": {"vqa_accuracy": 1.0, "questions": 1},
                     "corrected": {"vqa_accuracy": 0.0, "questions": 2}},
            "new": {"vqa_accuracy": 0.6667, "questions": 3, "accepted": {"vqa_accuracy": 1.0, "questions": 1},
                    "corrected": {"vqa_accuracy": 0.5, "questions": 2}},
        },
    }
    table = before_after(metrics, "vilt-ours", "visual-question-answering")
    assert table == {
        "headers": ["model", "VQA accuracy", "accepted rows", "corrected rows"],
        "rows": [["tiny-vilt-vqa (base)", "0.333 (3)", "1.000 (1)", "0.000 (2)"],
                 ["vilt-ours (new)", "0.667 (3)", "1.000 (1)", "0.500 (2)"]],
        "source": "on 3 questions (validation split)", "note": BIASED_NOTE}
    assert loss_curve(metrics) == [
        {"epoch": 0, "loss": 0.9, "split": "train"}, {"epoch": 1, "loss": 0.5, "split": "train"},
        {"epoch": 2, "loss": 0.25, "split": "train"},
        {"epoch": 0, "loss": 0.8, "split": "validation"}, {"epoch": 1, "loss": 0.6, "split": "validation"}]

    # a held-out campaign without accepted suggestions: no groups, no note; a job that scored nothing: no table
    fair = {**metrics, "evaluation": {"data": {"kind": "campaign", "campaign": "held-out", "questions": 2,
                                               "biased": False},
                                      "base": {"vqa_accuracy": 0.0, "questions": 2},
                                      "new": {"vqa_accuracy": 1.0, "questions": 2}}}
    assert before_after(fair, "vilt-ours", "visual-question-answering") == {
        "headers": ["model", "VQA accuracy"], "rows": [["tiny-vilt-vqa (base)", "0.000 (2)"],
                                                       ["vilt-ours (new)", "1.000 (2)"]],
        "source": "on 2 questions (held-out)", "note": None}
    no_questions = {**metrics, "evaluation": {"data": {"kind": "validation split", "questions": 0}}}
    assert before_after(no_questions, "vilt-ours", "visual-question-answering") is None
    assert before_after({k: v for k, v in metrics.items() if k != "evaluation"}, "x", "image-to-text") is None


def test_vilt_soft_scores_follow_vqav2(tiny_models):
    model, _ = adapter_for(TASK).load(SimpleNamespace(kind="vilt", source_scheme="local-dir"),
                                      str(tiny_models / "vilt-vqa"), Placement("cpu", "float32"))
    ids = {label: int(i) for i, label in model.config.id2label.items()}
    scores = soft_scores(model, [["red"], ["red", "red", "blue"], ["Yes", "yes", "yes", "yes"]])
    assert scores[0, ids["red"]] == 1.0 and scores[0].sum() == 1.0
    assert scores[1, ids["red"]] == pytest.approx(2 / 3) and scores[1, ids["blue"]] == pytest.approx(1 / 3)
    assert scores[2, ids["yes"]] == 1.0 and scores[2].sum() == 1.0


# --- ViLT: the head grows, known answers keep their rows ----------------------------------------------------


def test_vilt_extension_keeps_known_rows_and_appends_new_answers(settings, colours):
    adapter = adapter_for(TASK)
    placement = Placement("cpu", "float32")
    base = open_registry(settings).catalog.get(VILT)
    model, processor = adapter.load(base, str(settings.tiny_dir / "vilt-vqa"), placement)
    before = model.classifier[-1].weight.detach().clone(), model.classifier[-1].bias.detach().clone()
    data = adapter.prepare_data(load_export(colours.train, TASK, adapter.columns))
    changes = adapter.prepare_model(model, processor, data, FinetuneConfig(TASK, base=VILT, name="x"))

    assert changes == {"answers_known": len(VQA_ANSWERS), "answers_added": list(COLOURS)}  # "blue" is known
    head = model.classifier[-1]
    known = len(VQA_ANSWERS)
    assert head.out_features == known + 8 and model.config.num_labels == known + 8
    assert head.weight[:known].equal(before[0]) and head.bias[:known].equal(before[1])  # copied exactly
    assert [model.config.id2label[i] for i in range(known + 8)] == [*VQA_ANSWERS, *COLOURS]

    # the job saves the grown head: the checkpoint answers with the new labels through the registry
    result = job(settings, dataset=str(colours.train), eval_dataset=str(colours.heldout), epochs=6).run()
    saved = json.loads((result.path / "config.json").read_text())
    assert [saved["id2label"][str(i)] for i in range(known + 8)] == [*VQA_ANSWERS, *COLOURS]
    assert saved["label2id"]["purple"] == known
    assert result.metrics["model_changes"]["answers_added"] == list(COLOURS)
    registry = open_registry(settings)
    answer = run(registry, TASK, "vilt-ft", image=square("cyan", random.Random(5)), question=QUESTION, top_k=20)
    assert answer["model"]["id"] == "vilt-ft" and answer["answer"] in COLOURS  # it learnt a colour is asked for
    assert len(registry.call("vilt-ft", lambda bundle: bundle.model.config.id2label)) == known + 8


def test_a_short_vilt_job_lowers_the_loss_and_reports_base_and_new_accuracy(settings, colours):
    result = job(settings, dataset=str(colours.train), eval_dataset=str(colours.heldout), epochs=6).run()
    metrics = json.loads((result.path / METRICS_FILE).read_text())
    assert metrics["epochs"][-1]["train_loss"] < 0.7 * metrics["initial"]["train_loss"]
    evaluation = metrics["evaluation"]
    assert evaluation["data"]["kind"] == "dataset" and evaluation["data"]["questions"] == 16
    assert evaluation["data"]["biased"] is False
    assert evaluation["base"] == {"vqa_accuracy": 0.0, "questions": 16}  # it cannot say "purple"
    assert evaluation["new"]["questions"] == 16 and 0.0 <= evaluation["new"]["vqa_accuracy"] <= 1.0
    assert "tiny-vilt-vqa (base)" in result.describe() and "vilt-ft (new)" in result.describe()


def test_without_extend_an_unknown_answer_is_refused_and_the_served_model_is_unchanged(settings, colours):
    first = job(settings, dataset=str(colours.train), max_steps=1).run()
    weights = (first.path / "model.safetensors").read_bytes()
    refused = job(settings, dataset=str(colours.train), extend=False, overwrite=True)
    with pytest.raises(InvalidDatasetError, match="'purple', 'orange'.*--extend"):
        refused.run()
    assert listing(settings) == ["vilt-ft"] and (first.path / "model.safetensors").read_bytes() == weights
    assert main(["finetune", "--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu",
                 "--task", "vqa", "--base", VILT, "--name", "other", "--dataset", str(colours.train),
                 "--no-extend"]) == 2
    assert listing(settings) == ["vilt-ft"]


# --- BLIP VQA: it writes the answer ---------------------------------------------------------------------------


def test_a_short_blip_vqa_job_lowers_the_loss_and_answers_through_the_registry(settings, colours):
    result = job(settings, BLIP, "blip-vqa-ft", dataset=str(colours.train), max_steps=8, lr=1e-3).run()
    metrics = result.metrics
    assert metrics["epochs"][-1]["train_loss"] < metrics["initial"]["train_loss"]
    assert "model_changes" not in metrics  # a generative model has no answer head to grow
    assert metrics["evaluation"]["data"]["kind"] == "validation split"  # empty here: nothing to score
    registry = open_registry(settings)
    assert registry.catalog.get("blip-vqa-ft", TASK).kind == "blip"
    answer = run(registry, TASK, "blip-vqa-ft", image=square("pink", random.Random(2)), question=QUESTION,
                 max_new_tokens=3)
    assert answer["model"]["id"] == "blip-vqa-ft" and isinstance(answer["answer"], str)


# --- honest evaluation --------------------------------------------------------------------------------------------


def test_the_validation_split_is_reported_as_biased_accepted_and_corrected_apart(settings, colours):
    result = job(settings, store=colours.store, val_fraction=0.5, seed=3, max_steps=2).run()
    evaluation = result.metrics["evaluation"]
    assert evaluation["data"]["kind"] == "validation split" and evaluation["data"]["biased"] is True
    assert "biased" in evaluation["data"]["note"] and "biased" in result.describe()
    base = evaluation["base"]
    # the store has thumbs-up rows (the base's own answer, "blue" is one it gives for navy squares?) and
    # corrected rows: whatever the base answered on the accepted ones, the corrected ones are where it was wrong
    assert base["corrected"]["vqa_accuracy"] == 0.0 and base["corrected"]["questions"] >= 1
    if "accepted" in base:
        assert base["accepted"]["vqa_accuracy"] == 1.0
    assert base["questions"] == sum(base[g]["questions"] for g in ("accepted", "corrected") if g in base)
    assert set(evaluation["new"]) == set(base)


def test_a_held_out_campaign_scores_the_models_and_says_when_suggestions_were_accepted(settings, colours, capsys):
    rng = random.Random(9)
    folder = settings.data_dir / "held-out-pictures"
    folder.mkdir()
    for n, colour in enumerate([*COLOURS, "cyan", "cyan"]):
        square(colour, rng).save(folder / f"{n:02d}.png")
    with FeedbackStore.from_settings(settings) as store:
        queue = AnnotationQueue(store)
        queue.create_campaign("held-out", TASK, labels_per_item=2, model=BLIP)
        queue.import_folder("held-out", folder, open_registry(settings),
                            inputs={"question": QUESTION})
        for annotator in ("carol", "dave"):
            for n, item in enumerate(queue.next_batch("held-out", annotator, 20)):
                if annotator == "dave" and n == 0:
                    queue.submit("held-out", item.output_id, annotator)  # accepts BLIP's suggestion
                else:
                    picture = Image.open(store.media_path(item.output.input_media[0]))
                    queue.submit("held-out", item.output_id, annotator, correction=colour_of(picture))
    result = job(settings, dataset=str(colours.train), eval_campaign="held-out", epochs=6).run()
    evaluation = result.metrics["evaluation"]
    assert evaluation["data"]["kind"] == "campaign" and evaluation["data"]["questions"] == 10
    assert evaluation["data"]["answers"] == 20
    assert evaluation["data"]["biased"] is True and evaluation["data"]["accepted_suggestions"] == {BLIP: 1}
    assert evaluation["base"]["vqa_accuracy"] == 0.0
    assert result.metrics["data"]["source"]["held_out_rows_removed"] == 0  # the dataset holds none of them

    # trained from the store, which holds the campaign's labels too: those rows are left out of training
    with FeedbackStore.from_settings(settings) as store:
        record_corrections(store, open_registry(settings), [(square(c, rng), c) for c in COLOURS])
        from_store = job(settings, name="from-store", store=store, eval_campaign="held-out", val_fraction=0.0,
                         max_steps=1).run()
    assert from_store.metrics["data"]["rows"] == {"train": 8, "validation": 0}
    assert from_store.metrics["data"]["source"]["held_out_rows_removed"] == 11  # 10 items, one with 2 answers

    # mmdemo evaluate: the same metric for any catalog models, as a table and as JSON
    common = ["--profile", "tiny", "--data-dir", str(settings.data_dir), "--device", "cpu"]
    assert main(["evaluate", *common, "--task", "vqa", "--models", f"{VILT},vilt-ft", "--campaign", "held-out",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"]["vilt-ft"] == evaluation["new"] and printed["models"][VILT] == evaluation["base"]
    assert main(["evaluate", *common, "--task", "vqa", "--models", "vilt-ft", "--dataset", str(colours.heldout)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["model", "VQA", "accuracy"] and "vilt-ft" in table
    assert main(["evaluate", *common, "--task", "vqa", "--models", "nope", "--dataset", str(colours.heldout)]) == 1
    assert "Unknown model 'nope'" in capsys.readouterr().err
    assert main(["evaluate", *common, "--task", "caption", "--models", VILT, "--campaign", "held-out"]) == 2
    assert "serves visual-question-answering, not image-to-text" in capsys.readouterr().err


# --- bad data --------------------------------------------------------------------------------------------------


def test_no_records_or_missing_media_fail_clearly_and_leave_the_served_model_alone(settings, colours, tmp_path):
    empty = FeedbackStore(None, tmp_path / "empty")
    with pytest.raises(NothingToExportError, match="No approved feedback on visual-question-answering"):
        job(settings, store=empty).run()
    empty.close()
    assert listing(settings) == []

    served = job(settings, dataset=str(colours.train), max_steps=1).run()
    weights = (served.path / "model.safetensors").read_bytes()
    with FeedbackStore.from_settings(settings) as store:
        rng = random.Random(4)
        registry = open_registry(settings)
        record_corrections(store, registry, [(square(c, rng), c) for c in COLOURS])
        lost = store.get(3).output.input_media[0]
        store.media_path(lost).unlink()
        with pytest.raises(InvalidDatasetError, match="1 of the 8 .* lost their media file"):
            job(settings, store=store, overwrite=True).run()
    assert listing(settings) == ["vilt-ft"] and (served.path / "model.safetensors").read_bytes() == weights
    with pytest.raises(InvalidInputError, match="not both"):
        FinetuneConfig(TASK, base=VILT, name="x", eval_campaign="a", eval_dataset="b")


# --- LoRA ----------------------------------------------------------------------------------------------------


def vqa_logits(registry: ModelRegistry, model_id: str):
    """A forward pass on one question and picture, with the catalog model's processor."""
    processor = registry.call(model_id, lambda bundle: bundle.processor)
    inputs = processor(images=square("pink", random.Random(5)), text=QUESTION, return_tensors="pt")
    if registry.catalog.get(model_id).kind == "vilt":
        return lambda model: model(**inputs).logits
    import torch

    answer = processor.tokenizer(["pink"], return_tensors="pt")["input_ids"]

    def blip(model):  # the answer's loss (through the decoder) and the question's encoding
        out = model(**inputs, labels=answer)
        return torch.cat([out.loss.reshape(1), out.last_hidden_state.flatten()])

    return blip


def test_a_vilt_lora_with_new_answers_is_served_with_its_own_labels(settings, colours):
    """ViLT's answer head is trained whole beside the LoRA (peft's modules_to_save) and grew by 8 answers: the
    adapter cannot share the base's copy, so the registry serves it merged into a copy of its own."""
    import torch

    from mmdemo.finetune.vqa import extend_answer_head

    result = job(settings, name="vilt-lora", dataset=str(colours.train), eval_dataset=str(colours.heldout),
                 epochs=6, lr=1e-2, lora=True, lora_rank=2).run()
    files = set(result.path.iterdir())
    assert {result.path / name for name in ADAPTER_FILES} <= files and not (result.path / "model.safetensors").exists()
    assert result.metrics["lora"]["modules_to_save"] == ["classifier"]
    assert result.metrics["epochs"][-1]["train_loss"] < 0.7 * result.metrics["initial"]["train_loss"]
    added = result.metrics["model_changes"]["answers_added"]
    assert len(added) == 8

    registry, loads = counting_registry(settings)
    labels = registry.call("vilt-lora", lambda bundle: bundle.model.config.id2label)
    assert [labels[len(labels) - 8 + n] for n in range(8)] == added  # the adapter's labels, not the base's
    assert len(registry.call(VILT, lambda bundle: bundle.model.config.id2label)) == len(labels) - 8
    assert loads == [VILT, VILT]  # its own copy, the base's beside it

    # what peft computes on the base with the same head
    base = registry.catalog.get(VILT)
    location = registry.resolve_location(base)
    model, _ = adapter_for(TASK).load(base, location, Placement("cpu", "float32"))
    extend_answer_head(model, added)
    from peft import PeftModel

    twin = PeftModel.from_pretrained(model, str(result.path)).eval()
    forward = vqa_logits(registry, "vilt-lora")
    with torch.inference_mode():
        assert torch.allclose(served_output(registry, "vilt-lora", forward), forward(twin), atol=1e-5)

    # the job scored the adapter as the registry serves it
    scoring = adapter_for(TASK).evaluation
    questions = scoring.examples_from_export(colours.heldout)
    assert result.metrics["evaluation"]["new"] == scoring.score(scoring.served_model_answers(registry, "vilt-lora"),
                                                                questions)
    answers = [run(registry, TASK, "vilt-lora", image=square(c, random.Random(9)), question=QUESTION)["answer"]
               for c in COLOURS]
    assert set(answers) <= set(labels.values()) and set(answers) & set(added)


def test_a_blip_vqa_lora_is_served_on_the_base_copy_as_peft_computes_it(settings, colours):
    import torch

    result = job(settings, BLIP, "blip-vqa-lora", dataset=str(colours.train), max_steps=8, lr=1e-2, lora=True,
                 lora_rank=2).run()
    assert {p.name for p in result.path.iterdir()} >= ADAPTER_FILES and result.spec.adapter_of == BLIP
    assert result.metrics["epochs"][-1]["train_loss"] < result.metrics["initial"]["train_loss"]
    registry, loads = counting_registry(settings)
    forward = vqa_logits(registry, BLIP)
    served = served_output(registry, "blip-vqa-lora", forward)
    base = registry.catalog.get(BLIP)
    with torch.inference_mode():
        expected = forward(peft_twin(TASK, base, registry.resolve_location(base), result.path))
    assert torch.allclose(served, expected, atol=1e-5)
    assert not torch.allclose(served, served_output(registry, BLIP, forward), atol=1e-3)
    answer = run(registry, TASK, "blip-vqa-lora", image=square("pink", random.Random(2)), question=QUESTION,
                 max_new_tokens=3)
    assert answer["model"]["id"] == "blip-vqa-lora" and isinstance(answer["answer"], str)
    assert loads == [BLIP]
