"""Annotation mode on SQLite and on a real PostgreSQL server (tests/pg.py; skipped only when no server can
start): campaigns, items from recorded outputs and from an imported folder, leases that expire, several
labels per item, concurrent annotators never holding an item beyond the campaign's labels per item,
progress and agreement, the export of what annotators corrected, and the ``mmdemo annotate`` command."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mmdemo import cli
from mmdemo.feedback import (
    ADMIN_ROLE,
    AnnotationQueue,
    FeedbackStore,
    InvalidCampaignError,
    InvalidFeedbackError,
    NotInCampaignError,
    NotLeasedError,
    UnknownCampaignError,
    UnknownTaskError,
    export_dataset,
)
from mmdemo.feedback.tables import outputs

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"id": "tiny-blip", "revision": "abc123", "backend": "transformers", "device": "cpu"}
OTHER = {**MODEL, "id": "other-blip"}


def image(n: int):
    from PIL import Image

    img = Image.new("RGB", (16, 16), (n % 256, (n // 256) % 256, 90))
    img.putpixel((0, 0), (255 - n % 256, 0, 0))
    return img


def caption_output(store: FeedbackStore, n: int, model=MODEL) -> str:
    return store.record_output("image-to-text", inputs={"image": image(n)},
                               output={"text": f"caption {n}", "model": model})


class Clock:
    """A clock the test moves: leases expire without waiting."""

    def __init__(self):
        self.now = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def store(store_on_each_database):
    return store_on_each_database


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def queue(store, clock):
    return AnnotationQueue(store, clock=clock)


def campaign_with(queue: AnnotationQueue, count: int, name: str = "captions", **options) -> list[str]:
    """A caption campaign holding ``count`` new outputs; their ids, in item order."""
    ids = [caption_output(queue.store, n) for n in range(count)]
    queue.create_campaign(name, "image-to-text", instructions="Fix the caption.", **options)
    assert queue.add_outputs(name, ids) == count
    return ids


def ids_of(batch) -> list[str]:
    return [item.output_id for item in batch]


# --- campaigns and items -------------------------------------------------------------------------------


def test_create_a_campaign_and_refuse_bad_ones(queue):
    campaign = queue.create_campaign("vqa-nov", "visual-question-answering", instructions="Answer in one word.",
                                     labels_per_item=3, model="tiny-vilt-vqa", lease_minutes=5, created_by="alice")
    assert (campaign.task, campaign.labels_per_item, campaign.lease_seconds, campaign.model_id) == \
        ("visual-question-answering", 3, 300, "tiny-vilt-vqa")
    assert queue.campaign("vqa-nov") == queue.campaign(campaign.id) and queue.campaign("vqa-nov").items == 0
    assert [c.name for c in queue.campaigns()] == ["vqa-nov"]
    with pytest.raises(InvalidCampaignError, match="already a campaign named 'vqa-nov'"):
        queue.create_campaign("vqa-nov", "image-to-text")
    with pytest.raises(UnknownTaskError):
        queue.create_campaign("x", "captioning")
    for bad in ({"labels_per_item": 0}, {"labels_per_item": 2.5}, {"lease_minutes": 0}, {"lease_minutes": -1}):
        with pytest.raises(InvalidCampaignError):
            queue.create_campaign("x", "image-to-text", **bad)
    for bad_name in ("", "   ", "12", "a\nb", "x" * 201):
        with pytest.raises(InvalidCampaignError):
            queue.create_campaign(bad_name, "image-to-text")
    with pytest.raises(UnknownCampaignError, match="no annotation campaign 'nope'"):
        queue.next_batch("nope", "alice")
    assert [c.name for c in queue.campaigns()] == ["vqa-nov"]  # nothing half-made


def test_items_from_recorded_outputs_follow_the_filters_and_stop_expiring(queue, store, clock):
    old = caption_output(store, 1)
    rated = caption_output(store, 2)
    store.add_feedback(rated, annotator="someone", thumbs=1)
    other_model = caption_output(store, 3, model=OTHER)
    t2i = store.record_output("text-to-image", inputs={"prompt": "a red bicycle"},
                              output={"images": [image(9)], "seed": 1, "model": MODEL})
    with store.db.write() as conn:  # ``old`` was recorded long ago; another output's window has closed
        conn.execute(outputs.update().where(outputs.c.id == old)
                     .values(created_at=datetime(2026, 1, 1, tzinfo=timezone.utc)))
    expired = caption_output(store, 4)
    with store.db.write() as conn:
        conn.execute(outputs.update().where(outputs.c.id == expired)
                     .values(expires_at=datetime(2026, 1, 2, tzinfo=timezone.utc)))
    clock.now = datetime.now(timezone.utc)

    queue.create_campaign("recent", "image-to-text")
    assert queue.add_recorded("recent", since="2026-06-01") == 1  # other_model only: rated, old, expired out
    queue.create_campaign("tiny-only", "image-to-text")
    assert queue.add_recorded("tiny-only", model="tiny-blip", without_feedback=False) == 2  # old and rated
    assert queue.add_recorded("tiny-only", model="tiny-blip", without_feedback=False) == 0  # no item twice
    queue.create_campaign("all", "image-to-text")
    assert queue.add_recorded("all", limit=1) == 1
    assert ids_of(queue.next_batch("all", "alice")) == [old]  # oldest first
    assert queue.campaign("all").items == 1 and t2i not in ids_of(queue.next_batch("tiny-only", "alice"))
    # items are open for feedback for as long as they are items: no expiry, never purged as unrated
    assert all(store.get_output(i).expires_at is None for i in (old, rated, other_model))
    with pytest.raises(NotInCampaignError, match="text-to-image"):
        queue.add_outputs("all", [t2i])


def test_deleting_an_output_removes_its_item(queue, store):
    ids = campaign_with(queue, 2)
    store.delete_output(ids[0], actor_role=ADMIN_ROLE)
    assert queue.campaign("captions").items == 1
    assert ids_of(queue.next_batch("captions", "alice")) == [ids[1]]


# --- batches and leases --------------------------------------------------------------------------------


def test_two_annotators_get_disjoint_batches_and_keep_theirs_when_they_ask_again(queue):
    ids = campaign_with(queue, 25)
    alice, bob = queue.next_batch("captions", "alice"), queue.next_batch("captions", "bob")
    assert ids_of(alice) == ids[:10] and ids_of(bob) == ids[10:20]  # default batch: 10
    assert alice[0].output.output["text"] == "caption 0" and alice[0].output.input_media  # the suggestion
    assert ids_of(queue.next_batch("captions", "alice", 12)) == ids[:10] + ids[20:22]  # held first, topped up
    assert ids_of(queue.next_batch("captions", "carol", 10)) == ids[22:]
    assert queue.next_batch("captions", "dave") == []  # everything is held


def test_submit_saves_a_feedback_record_and_no_one_labels_an_item_twice(queue, store):
    ids = campaign_with(queue, 3)
    batch = queue.next_batch("captions", "alice", 2)
    saved = queue.submit("captions", batch[0].output_id, "alice", correction="a grey cat", comment="grey")
    record = store.get(saved.id)
    assert (record.annotator, record.correction, record.comment, record.output_id) == \
        ("alice", "a grey cat", "grey", ids[0])
    accepted = queue.submit("captions", batch[1].output_id, "alice")  # unchanged: the suggestion is right
    assert store.get(accepted.id).thumbs == 1 and store.get(accepted.id).correction is None
    again = queue.submit("captions", ids[0], "alice", correction="a grey cat on a sofa")  # fixes her label
    assert again.id == saved.id and not again.created
    assert ids_of(queue.next_batch("captions", "alice")) == [ids[2]]  # never the items she labelled
    queue.submit("captions", ids[2], "alice", thumbs=-1)
    assert queue.next_batch("captions", "alice") == []


def test_an_item_outside_the_annotators_batch_is_refused_and_nothing_is_saved(queue, store):
    ids = campaign_with(queue, 3)
    stray = caption_output(store, 99)
    queue.next_batch("captions", "alice", 1)
    with pytest.raises(NotLeasedError, match="not in bob's batch"):
        queue.submit("captions", ids[0], "bob", correction="mine")
    with pytest.raises(NotLeasedError, match="not in alice's batch"):
        queue.submit("captions", ids[1], "alice", correction="not given yet")
    with pytest.raises(NotInCampaignError):
        queue.submit("captions", stray, "alice", correction="not an item")
    with pytest.raises(InvalidFeedbackError, match="empty"):
        queue.submit("captions", ids[0], "alice", correction="  ")
    assert store.count() == 0
    assert queue.progress("captions").labels_done == 0


def test_an_annotator_who_already_rated_an_output_in_the_app_is_not_given_it(queue, store):
    ids = campaign_with(queue, 2)
    store.add_feedback(ids[0], annotator="alice", thumbs=1)
    assert ids_of(queue.next_batch("captions", "alice")) == [ids[1]]
    assert ids_of(queue.next_batch("captions", "bob")) == [ids[0]]


def test_skipping_gives_the_item_to_others_but_not_back_to_the_annotator(queue):
    ids = campaign_with(queue, 2)
    queue.next_batch("captions", "alice", 1)
    queue.skip("captions", ids[0], "alice")
    with pytest.raises(NotLeasedError, match="You skipped"):
        queue.submit("captions", ids[0], "alice", correction="changed my mind")
    assert ids_of(queue.next_batch("captions", "alice")) == [ids[1]]
    assert ids_of(queue.next_batch("captions", "bob")) == [ids[0]]
    queue.submit("captions", ids[1], "alice", correction="done")
    with pytest.raises(NotLeasedError, match="already submitted"):
        queue.skip("captions", ids[1], "alice")
    progress = queue.progress("captions")
    assert {(w.annotator, w.done, w.skipped, w.leased) for w in progress.annotators} == \
        {("alice", 1, 1, 0), ("bob", 0, 0, 1)}


def test_release_gives_back_a_whole_batch(queue):
    ids = campaign_with(queue, 3)
    queue.next_batch("captions", "alice", 3)
    assert queue.release("captions", "alice") == 3
    assert ids_of(queue.next_batch("captions", "bob", 3)) == ids


def test_an_abandoned_lease_expires_and_the_item_returns_to_the_pool(queue, clock):
    ids = campaign_with(queue, 3, lease_minutes=10)
    assert ids_of(queue.next_batch("captions", "alice", 2)) == ids[:2]
    clock.advance(minutes=9)
    assert ids_of(queue.next_batch("captions", "bob", 3)) == [ids[2]]  # alice's leases still run
    clock.advance(minutes=2)  # alice's leases ran out; bob's (renewed at minute 9) still run
    assert ids_of(queue.next_batch("captions", "bob", 3)) == ids
    with pytest.raises(NotLeasedError, match="expired and it was given to someone else"):
        queue.submit("captions", ids[0], "alice", correction="too late")
    assert queue.progress("captions").labels_done == 0
    clock.advance(minutes=11)  # bob's leases ran out too, and nobody took the items since
    saved = queue.submit("captions", ids[1], "alice", correction="late but free")
    assert saved.created and queue.progress("captions").labels_done == 1
    assert ids_of(queue.next_batch("captions", "alice", 5)) == [ids[0], ids[2]]  # her expired leases, renewed


def test_several_labels_per_item_progress_and_agreement(queue):
    ids = campaign_with(queue, 4, labels_per_item=2)
    a, b = queue.next_batch("captions", "alice", 4), queue.next_batch("captions", "bob", 4)
    assert ids_of(a) == ids_of(b) == ids  # two labels wanted: both get every item
    assert queue.next_batch("captions", "carol", 4) == []  # but no third annotator
    answers = {"alice": ["a cat", "a dog", None, "a car"], "bob": ["A  Cat ", "a wolf", None, None]}
    for who, corrections in answers.items():
        for output_id, correction in zip(ids[:3], corrections):
            queue.submit("captions", output_id, who, correction=correction)
    queue.submit("captions", ids[3], "alice", correction="a car")
    progress = queue.progress("captions")
    assert (progress.items, progress.labels_wanted, progress.labels_done) == (4, 8, 7)
    assert (progress.complete_items, progress.items_needing_labels, progress.leased_items) == (3, 1, 1)
    # cat = cat (case and spaces aside), dog != wolf, accepted = accepted
    assert (progress.multiply_labelled, progress.agreeing) == (3, 2) and progress.agreement == pytest.approx(2 / 3)
    assert "7/8 labels" in progress.describe() and "2/3 items with several labels agree" in progress.describe()
    assert progress.to_dict()["annotators"][0]["done"] == 4


# --- concurrency --------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels_per_item", [1, 2])
def test_concurrent_annotators_never_hold_an_item_beyond_its_labels_per_item(queue, labels_per_item):
    ids = campaign_with(queue, 40, labels_per_item=labels_per_item)
    annotators = [f"annotator-{i}" for i in range(8)]
    start = threading.Barrier(len(annotators))
    batches: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def ask(name: str) -> None:
        try:
            start.wait()
            batches[name] = ids_of(queue.next_batch("captions", name, 7))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(name,)) for name in annotators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    holders = Counter(output_id for batch in batches.values() for output_id in batch)
    assert max(holders.values()) <= labels_per_item
    assert sum(len(b) for b in batches.values()) == min(8 * 7, 40 * labels_per_item)  # nobody went short
    assert all(len(set(batch)) == len(batch) for batch in batches.values())


def test_concurrent_annotators_finish_a_campaign_with_exactly_the_labels_it_wants(queue, store):
    ids = campaign_with(queue, 24, labels_per_item=2)
    labelled: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            mine = labelled.setdefault(name, [])
            while batch := queue.next_batch("captions", name, 3):
                for item in batch:
                    queue.submit("captions", item.output_id, name, correction=f"{name} says {item.output_id[:6]}")
                    mine.append(item.output_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"annotator-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(len(set(items)) == len(items) for items in labelled.values())  # nobody labelled an item twice
    assert Counter(i for items in labelled.values() for i in items) == {i: 2 for i in ids}
    assert store.count(only="corrected") == 48
    progress = queue.progress("captions")
    assert (progress.labels_done, progress.complete_items, progress.items_needing_labels) == (48, 24, 0)


# --- export -------------------------------------------------------------------------------------------


def test_the_export_holds_what_annotators_corrected(queue, tmp_path):
    import datasets

    ids = campaign_with(queue, 3)
    batch = queue.next_batch("captions", "alice")
    queue.submit("captions", batch[0].output_id, "alice", correction="a tabby cat asleep")
    queue.submit("captions", batch[1].output_id, "alice")  # the suggestion, accepted
    queue.skip("captions", batch[2].output_id, "alice")
    summary = export_dataset(queue.store, "image-to-text", tmp_path / "out", val_fraction=0.0)
    rows = datasets.load_from_disk(str(tmp_path / "out"))["train"].select_columns(
        ["text", "output_id", "annotator", "corrected"]).to_list()
    assert summary.records == 2
    assert sorted(rows, key=lambda r: r["text"]) == [
        {"text": "a tabby cat asleep", "output_id": ids[0], "annotator": "alice", "corrected": True},
        {"text": "caption 1", "output_id": ids[1], "annotator": "alice", "corrected": False},
    ]


# --- importing a folder -------------------------------------------------------------------------------


def test_import_a_folder_pre_labelled_by_a_catalog_model(tmp_path, tiny_settings, shared_registry):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(ROOT / "assets" / "cat.jpg", folder / "a-cat.jpg")
    shutil.copy(ROOT / "assets" / "coffee.jpg", folder / "b-coffee.JPG")
    (folder / "c-broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    with FeedbackStore(None, tmp_path / "data") as store:
        queue = AnnotationQueue(store)
        queue.create_campaign("photos", "zero-shot-image-classification", model="tiny-clip")
        summary = queue.import_folder("photos", folder, shared_registry, inputs={"labels": "cat, cup, car"})
        assert summary.added == 2 and [name for name, _ in summary.skipped] == ["c-broken.png"]
        assert summary.model_id == "tiny-clip"
        batch = queue.next_batch("photos", "alice")
        assert ids_of(batch) == summary.output_ids
        suggestion = batch[0].output
        assert suggestion.model_id == "tiny-clip" and suggestion.inputs["labels"] == ["cat", "cup", "car"]
        assert {item["label"] for item in suggestion.output["labels"]} == {"cat", "cup", "car"}
        assert suggestion.session == "annotation-import" and store.media_path(suggestion.input_media[0]).is_file()
        saved = queue.submit("photos", batch[0].output_id, "alice", correction=["cat"])
        assert store.get(saved.id).correction == ["cat"]
        queue.create_campaign("captions", "image-to-text")
        with pytest.raises(Exception, match="question|VQA|task"):
            queue.import_folder("captions", folder, shared_registry, model="tiny-vilt-vqa")


# --- the command --------------------------------------------------------------------------------------


def test_the_annotate_command(tmp_path, tiny_data_dir, capsys):
    database = f"sqlite:///{tmp_path / 'feedback.db'}"
    common = ["--profile", "tiny", "--data-dir", str(tiny_data_dir), "--database-url", database, "--device", "cpu"]
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(ROOT / "assets" / "cat.jpg", folder / "cat.jpg")

    def mmdemo(*argv: str) -> tuple[int, str]:
        code = cli.main([*argv[:2], *common, *argv[2:]])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = mmdemo("annotate", "create", "cats", "--task", "caption", "--labels-per-item", "2",
                       "--model", "tiny-blip-caption", "--instructions", "Fix the caption.")
    assert code == 0 and "created campaign cats" in out
    assert mmdemo("annotate", "create", "cats", "--task", "caption")[0] == 2  # the name is taken
    assert mmdemo("annotate", "create", "vqa", "--task", "vqa", "--model", "tiny-blip-caption")[0] == 2
    code, out = mmdemo("annotate", "import", str(folder), "--campaign", "cats")
    assert code == 0 and "1 item(s) pre-labelled by tiny-blip-caption" in out
    code, out = mmdemo("annotate", "add", "cats")
    assert code == 0 and "added 0 recorded output(s)" in out  # the imported one is in already
    code, out = mmdemo("annotate", "list")
    assert code == 0 and "cats" in out and "1 items" in out
    with FeedbackStore(database, tiny_data_dir) as store:  # the data dir the commands used: its media folder
        queue = AnnotationQueue(store)
        item = queue.next_batch("cats", "alice")[0]
        queue.submit("cats", item.output_id, "alice", correction="a cat")
    code, out = mmdemo("annotate", "progress", "cats")
    assert code == 0 and "1/2 labels" in out and "alice: 1 done" in out
    code, out = mmdemo("annotate", "progress", "dogs")
    assert code == 2 and "no annotation campaign 'dogs'" in out
