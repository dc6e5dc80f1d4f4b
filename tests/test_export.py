"""Export of feedback as fine-tuning datasets: the shape of each task, the three formats loading
back with ``datasets``, the deterministic grouped split, duplicates merged, the dataset card."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmdemo.errors import InvalidInputError  # noqa: E402
from mmdemo.feedback import FeedbackStore, NothingToExportError, export_archive, export_dataset  # noqa: E402
from mmdemo.feedback.export import split_of  # noqa: E402

MODEL = {"id": "tiny-blip", "revision": "rev1", "backend": "transformers"}
FORMATS = ("datasets", "parquet", "jsonl")


def image(n: int, size: int = 12) -> Image.Image:
    img = Image.new("RGB", (size, size), (n % 256, (n * 7) % 256, 40))
    img.putpixel((1, 1), (0, 0, 255 - n % 256))
    return img


def wav_bytes(n: int) -> bytes:
    t = np.arange(1600) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * np.sin(2 * np.pi * (200 + 10 * n) * t)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def load(out: Path, fmt: str, config: str | None = None) -> datasets.DatasetDict:
    """What a fine-tuning script would do with each format."""
    if fmt == "datasets":
        return datasets.load_from_disk(str(out / config if config else out))
    if fmt == "parquet":
        return datasets.load_dataset(str(out), config or "default")
    folder = out / (config or "data")
    files = {split: str(folder / f"{split}.jsonl") for split in ("train", "validation")
             if (folder / f"{split}.jsonl").exists()}
    return datasets.load_dataset("json", data_files=files)


def rows(dataset_dict) -> list[dict]:
    return [row for split in dataset_dict.values() for row in split]


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(None, tmp_path / "data") as store:
        yield store


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """One store with feedback for every task, shared by the read-only tests."""
    store = FeedbackStore(None, tmp_path_factory.mktemp("filled"))
    for i in range(12):
        out = store.record_output("image-to-text", inputs={"image": image(i)},
                                  output={"text": f"model caption {i}", "model": MODEL})
        if i % 3 == 0:
            store.add_feedback(out, annotator="alice", thumbs=-1, correction=f"corrected caption {i}")
        elif i % 3 == 1:
            store.add_feedback(out, annotator="alice", thumbs=1)
        else:
            store.add_feedback(out, annotator="alice", thumbs=-1)
        for q in ("what colour?", "how many?"):
            out = store.record_output("visual-question-answering", inputs={"image": image(i), "question": q},
                                      output={"answer": "red", "model": MODEL})
            store.add_feedback(out, annotator="bob", thumbs=1, correction=f"{q} {i}")
        out = store.record_output("zero-shot-image-classification", inputs={"image": image(i), "labels": "cat, dog"},
                                  output={"labels": [{"label": "cat", "score": 0.6}, {"label": "dog", "score": 0.4}],
                                          "model": MODEL})
        store.add_feedback(out, annotator="bob", correction=["dog", "puppy"] if i % 2 else None, thumbs=1)
        out = store.record_output("automatic-speech-recognition", inputs={"audio": wav_bytes(i), "language": "en"},
                                  output={"text": "helo", "language": "en", "model": MODEL})
        store.add_feedback(out, annotator="carol", correction=f"hello {i}")
    for i in range(4):
        out = store.record_output("text-to-image", inputs={"prompt": f"prompt {i % 2}", "negative_prompt": "blur"},
                                  output={"images": [image(100 + 3 * i + j) for j in range(3)], "seed": i,
                                          "model": MODEL})
        correction = {"image_ratings": [5, 3, 1], "preferred": None} if i % 2 else {"preferred": 1}
        store.add_feedback(out, annotator="dave", correction=correction)
    yield store
    store.close()


# --- every task, every format ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_captions_export_with_the_correction_else_the_accepted_output(filled, tmp_path, fmt):
    summary = export_dataset(filled, "image-to-text", tmp_path / "out", format=fmt, val_fraction=0.3, seed=1)
    assert summary.records == 8 and summary.total_rows == 8  # approved: corrected or thumbs up
    found = rows(load(tmp_path / "out", fmt))
    texts = {row["text"] for row in found}
    assert texts == {f"corrected caption {i}" for i in (0, 3, 6, 9)} | {f"model caption {i}" for i in (1, 4, 7, 10)}
    row = found[0]
    assert {"record_id", "output_id", "model_id", "model_revision", "annotator", "annotated_at"} <= set(row)
    assert row["model_id"] == "tiny-blip" and row["annotator"] == "alice"
    if fmt == "jsonl":
        assert (tmp_path / "out" / "data" / row["image"]).is_file()
    else:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (12, 12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_vqa_zero_shot_and_speech_shapes(filled, tmp_path, fmt):
    vqa = rows(load(export_dataset(filled, "visual-question-answering", tmp_path / "vqa", format=fmt).out_dir, fmt))
    assert len(vqa) == 24 and {"image", "question", "answer"} <= set(vqa[0])
    assert {(r["question"], r["answer"]) for r in vqa} >= {("what colour?", "what colour? 0"), ("how many?", "how many? 11")}
    zs = rows(load(export_dataset(filled, "zero-shot-image-classification", tmp_path / "zs", format=fmt).out_dir, fmt))
    assert sorted(map(tuple, (r["labels"] for r in zs))) == sorted([("dog", "puppy")] * 6 + [("cat",)] * 6)
    assert all(r["candidate_labels"] == ["cat", "dog"] for r in zs)
    asr = rows(load(export_dataset(filled, "automatic-speech-recognition", tmp_path / "asr", format=fmt).out_dir, fmt))
    assert {r["text"] for r in asr} == {f"hello {i}" for i in range(12)} and asr[0]["language"] == "en"
    if fmt != "jsonl":  # audio as {bytes, path}, decoded with soundfile: no torchcodec involved
        audio = asr[0]["audio"]
        assert set(audio) == {"bytes", "path"} and audio["path"].endswith(".wav")
        samples, rate = sf.read(io.BytesIO(audio["bytes"]))
        assert rate == 16000 and len(samples) == 1600


def test_audio_feature_loads_without_decoding(filled, tmp_path):
    out = export_dataset(filled, "automatic-speech-recognition", tmp_path / "asr", format="parquet").out_dir
    ds = load(out, "parquet")
    assert isinstance(ds["train"].features["audio"], datasets.Audio) and ds["train"].features["audio"].decode is False
    uploaded = {wav_bytes(i) for i in range(12)}
    assert {r["audio"]["bytes"] for r in rows(ds)} == uploaded  # kept exactly as uploaded


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_to_image_ratings_and_preference_pairs(filled, tmp_path, fmt):
    summary = export_dataset(filled, "text-to-image", tmp_path / "t2i", format=fmt, val_fraction=0.0)
    assert summary.rows == {"ratings": {"train": 12}, "preferences": {"train": 2 * 2 + 3 * 2}}
    ratings = rows(load(summary.out_dir, fmt, "ratings"))
    assert sorted(r["rating"] for r in ratings if r["rating"] is not None) == [1, 1, 3, 3, 5, 5]
    assert sum(r["preferred"] for r in ratings) == 2
    assert {r["prompt"] for r in ratings} == {"prompt 0", "prompt 1"} and ratings[0]["negative_prompt"] == "blur"
    pairs = rows(load(summary.out_dir, fmt, "preferences"))
    assert {r["reason"] for r in pairs} == {"preferred", "ratings"}
    assert {"chosen", "rejected", "prompt", "negative_prompt"} <= set(pairs[0])


def test_parquet_embeds_the_media_bytes_not_paths(filled, tmp_path):
    out = export_dataset(filled, "image-to-text", tmp_path / "pq", format="parquet").out_dir
    shards = sorted((out / "data").glob("*.parquet"))
    assert shards and all("-of-" in s.name for s in shards)
    table = pq.read_table(shards[0])
    for cell in table.column("image").to_pylist():
        assert cell["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
        assert "/" not in cell["path"]  # a content ref, no path of this machine
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"]["_type"] == "Image"


# --- split, duplicates, filters -------------------------------------------------------------------


def test_split_is_deterministic_and_keeps_an_input_on_one_side(filled, tmp_path):
    a = export_dataset(filled, "visual-question-answering", tmp_path / "a", format="jsonl", val_fraction=0.4, seed=3)
    b = export_dataset(filled, "visual-question-answering", tmp_path / "b", format="jsonl", val_fraction=0.4, seed=3)
    assert a.rows == b.rows
    for split in a.rows["default"]:
        assert (tmp_path / "a" / "data" / f"{split}.jsonl").read_text().replace("/a/", "/") == \
            (tmp_path / "b" / "data" / f"{split}.jsonl").read_text().replace("/b/", "/")
    side: dict[str, str] = {}
    for split in ("train", "validation"):
        for line in (tmp_path / "a" / "data" / f"{split}.jsonl").read_text().splitlines():
            picture = json.loads(line)["image"]
            assert side.setdefault(picture, split) == split  # both questions about one image together
    assert set(side.values()) == {"train", "validation"}
    assert {split_of(k, 3, 0.4) for k in map(str, range(200))} == {"train", "validation"}
    assert sum(split_of(str(k), 0, 0.1) == "validation" for k in range(5000)) in range(400, 600)
    assert [split_of(str(k), 1, 0.5) for k in range(50)] != [split_of(str(k), 2, 0.5) for k in range(50)]


def test_exact_duplicates_are_merged(store, tmp_path):
    ids = []
    for annotator in ("alice", "bob", "carol"):
        out = store.record_output("image-to-text", inputs={"image": image(1)}, output={"text": "x"})
        ids.append(store.add_feedback(out, annotator=annotator, correction="a red square").id)
    out = store.record_output("image-to-text", inputs={"image": image(1)}, output={"text": "x"})
    store.add_feedback(out, annotator="dave", correction="a different caption")
    summary = export_dataset(store, "image-to-text", tmp_path / "out", format="datasets")
    assert summary.total_rows == 2 and summary.duplicates == 2 and summary.records == 4
    merged = [r for r in rows(load(tmp_path / "out", "datasets")) if r["text"] == "a red square"]
    assert len(merged) == 1 and merged[0]["record_id"] == ids[0] and merged[0]["merged_record_ids"] == ids[1:]


def test_only_and_since_filters(filled, tmp_path):
    counts = {only: export_dataset(filled, "image-to-text", tmp_path / only, format="jsonl", only=only).total_rows
              for only in ("corrected", "approved", "all")}
    assert counts == {"corrected": 4, "approved": 8, "all": 12}
    with pytest.raises(NothingToExportError, match="since 2999-01-01"):
        export_dataset(filled, "image-to-text", tmp_path / "none", since="2999-01-01")
    assert not (tmp_path / "none").exists()


def test_dataset_card_has_counts_per_split_and_the_schema(filled, tmp_path):
    summary = export_dataset(filled, "image-to-text", tmp_path / "out", format="parquet", val_fraction=0.5, seed=2)
    card = summary.card.read_text()
    assert card.startswith("---\n") and "# mmdemo feedback: image-to-text" in card
    for split, n in summary.rows["default"].items():
        assert f"| default | {split} | {n} |" in card
    assert "| `text` | string |" in card and "| `image` | image |" in card and "| `merged_record_ids` |" in card
    assert "path: data/train-*" in card and "`tiny-blip@rev1`: 8 rows" in card
    # the card's YAML is what the Hub reads: load_dataset picks up the configs
    assert datasets.load_dataset(str(summary.out_dir))["train"].num_rows == summary.rows["default"]["train"]


# --- safety of the output folder ------------------------------------------------------------------


def test_output_folder_rules(filled, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="not empty"):
        export_dataset(filled, "image-to-text", out)
    with pytest.raises(InvalidInputError, match="holds no mmdemo export"):
        export_dataset(filled, "image-to-text", out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"
    again = tmp_path / "again"
    export_dataset(filled, "image-to-text", again, format="jsonl")
    export_dataset(filled, "image-to-text", again, format="datasets", overwrite=True)
    assert not (again / "data").exists() and (again / "dataset_dict.json").is_file()
    for bad in ({"format": "csv"}, {"only": "best"}, {"val_fraction": 1.0}, {"seed": "x"}, {"since": "soon"}):
        with pytest.raises(InvalidInputError):
            export_dataset(filled, "image-to-text", tmp_path / "bad", **bad)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_failed_export_leaves_no_folder(filled, tmp_path, monkeypatch):
    import mmdemo.feedback.export as export

    monkeypatch.setattr(export, "_media_value", lambda store, ref: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        export_dataset(filled, "image-to-text", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_media_file_skips_the_row_and_says_so(store, tmp_path):
    for i in range(3):
        out = store.record_output("image-to-text", inputs={"image": image(i)}, output={"text": "x"})
        store.add_feedback(out, annotator="a", thumbs=1)
    store.media_path(store.get_output(out).input_media[0]).unlink()
    summary = export_dataset(store, "image-to-text", tmp_path / "out")
    assert summary.total_rows == 2 and summary.missing_media == 1
    assert "media file was missing: 1" in summary.card.read_text()


def test_admin_download_is_one_zip(filled, tmp_path):
    archive = export_archive(filled, "image-to-text", tmp_path / "exports", format="parquet")
    assert archive.suffix == ".zip" and archive.parent == tmp_path / "exports"
    names = zipfile.ZipFile(archive).namelist()
    assert "README.md" in names and any(n.startswith("data/train-") for n in names)
    assert [p for p in (tmp_path / "exports").iterdir()] == [archive]


def test_push_to_hub_needs_a_token_and_uploads_the_export(filled, tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidInputError, match="HF_TOKEN"):
        export_dataset(filled, "image-to-text", tmp_path / "nope", push_to_hub="me/feedback")
    assert not (tmp_path / "nope").exists()

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo, **kwargs):
            calls.append(("create_repo", repo, kwargs["repo_type"]))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            ignored = kwargs.get("ignore_patterns") or []
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()
                                                            if p.name not in ignored)))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
            calls.append(("upload_file", path_in_repo, path_or_fileobj[:3]))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, config_name, **kw: calls.append(("push_to_hub", repo, config_name)))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    summary = export_dataset(filled, "image-to-text", tmp_path / "pq", format="parquet", push_to_hub="me/feedback")
    assert summary.pushed_to == "me/feedback"
    assert ("token", "hf_test") in calls and ("create_repo", "me/feedback", "dataset") in calls
    assert ("upload_folder", "me/feedback", ["README.md", "data"]) in calls
    calls.clear()
    export_dataset(filled, "text-to-image", tmp_path / "ds", format="datasets", push_to_hub="me/prefs")
    assert ("push_to_hub", "me/prefs", "ratings") in calls and ("push_to_hub", "me/prefs", "preferences") in calls
    assert ("upload_file", "README.md", b"---") in calls
