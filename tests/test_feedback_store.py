"""The feedback store on SQLite and on a real PostgreSQL server (see tests/pg.py; skipped only when
no server can be started): migrations, outputs and feedback, idempotency, validation with nothing
half-written, media by content hash, deletes, concurrency."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from sqlalchemy import inspect as sa_inspect

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pg, media_samples, whatever the import mode

import media_samples as ms  # noqa: E402

from mmdemo.config import Settings  # noqa: E402
from mmdemo.errors import AudioTooLongError, ImageTooLargeError, InvalidAudioError, InvalidInputError  # noqa: E402
from mmdemo.feedback import (  # noqa: E402
    ExpiredOutputError,
    FeedbackStore,
    InvalidFeedbackError,
    InvalidMediaRefError,
    PermissionDeniedError,
    RecordNotFoundError,
    StoreError,
    UnknownOutputError,
    UnknownTaskError,
    anonymous_annotator,
)
from mmdemo.feedback.migrations import MIGRATIONS, Migration, applied_migrations, migrate  # noqa: E402
from mmdemo.feedback.schemas import MAX_CORRECTION_BYTES  # noqa: E402
from mmdemo.feedback.tables import metadata  # noqa: E402
from mmdemo.media import MediaLimits  # noqa: E402

MODEL = {"id": "tiny-blip", "revision": "abc123", "backend": "transformers", "device": "cpu"}


def image(n: int = 0, size: int = 16) -> Image.Image:
    """A small image unique to ``n``."""
    img = Image.new("RGB", (size, size), (n % 256, (n // 256) % 256, 90))
    img.putpixel((0, 0), (255 - n % 256, 0, 0))
    return img


def wav_bytes(seconds: float = 0.2, rate: int = 16000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def caption_output(store: FeedbackStore, n: int = 0, **kwargs) -> str:
    return store.record_output("image-to-text", inputs={"image": image(n)},
                               output={"text": f"caption {n}", "model": MODEL}, **kwargs)


def t2i_output(store: FeedbackStore, count: int = 3, prompt: str = "a red bicycle") -> str:
    images = [image(200 + i) for i in range(count)]
    return store.record_output("text-to-image", inputs={"prompt": prompt, "negative_prompt": "blurry"},
                               output={"images": images, "seed": 7, "model": MODEL}, settings={"steps": 2})


def media_files(store: FeedbackStore) -> list[Path]:
    root = store.media.root
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def row_counts(store: FeedbackStore) -> dict[str, int]:
    with store.db.read() as conn:
        return {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()
                for t in ("outputs", "feedback", "media", "output_media")}


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request):
    """None (SQLite in the test's data dir) or an empty PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url = request.getfixturevalue("pg_database")
    request.getfixturevalue("pg_server").reset_database(url)
    return url


@pytest.fixture
def make_store(database_url, tmp_path):
    stores: list[FeedbackStore] = []

    def make(**kwargs) -> FeedbackStore:
        store = FeedbackStore(database_url, tmp_path / "data", **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store) -> FeedbackStore:
    """A store on each database."""
    return make_store()


@pytest.fixture
def local_store(tmp_path):
    """A SQLite store, for checks made before any database work (validation, media files)."""
    with FeedbackStore(None, tmp_path / "data") as store:
        yield store


# --- database and migrations -----------------------------------------------------------------------


def test_schema_after_migrations_matches_the_tables_the_code_queries(store):
    assert applied_migrations(store.db) == [m.name for m in MIGRATIONS]
    with store.db.engine.connect() as conn:
        inspector = sa_inspect(conn)
        for table in metadata.sorted_tables:
            columns = {c["name"] for c in inspector.get_columns(table.name)}
            assert columns == {c.name for c in table.columns}, table.name
            assert {i["name"] for i in inspector.get_indexes(table.name)} >= {i.name for i in table.indexes}
        uniques = {u["name"] for u in inspector.get_unique_constraints("feedback")}
        assert "uq_feedback_output_annotator" in uniques


def test_migrations_are_applied_once_even_by_concurrent_start_ups(make_store):
    first = make_store()
    assert first.migrate() == []  # already applied when the store opened
    errors = []

    def open_store():
        try:
            make_store().count()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert applied_migrations(first.db) == [m.name for m in MIGRATIONS]


def test_new_migration_runs_in_order_and_a_newer_database_is_refused(store):
    extra = Migration("0002_test_column", lambda conn: conn.exec_driver_sql(
        "ALTER TABLE outputs ADD COLUMN test_note VARCHAR(20)"))
    assert migrate(store.db, (*MIGRATIONS, extra)) == ["0002_test_column"]
    assert migrate(store.db, (*MIGRATIONS, extra)) == []
    with pytest.raises(StoreError, match="newer mmdemo"):
        migrate(store.db, MIGRATIONS)


def test_failed_migration_leaves_nothing_behind(store):
    def broken(conn):
        conn.exec_driver_sql("CREATE TABLE half_done (id INTEGER)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        migrate(store.db, (*MIGRATIONS, Migration("0002_broken", broken)))
    assert applied_migrations(store.db) == [m.name for m in MIGRATIONS]
    with store.db.engine.connect() as conn:
        assert not sa_inspect(conn).has_table("half_done")


def test_sqlite_runs_in_wal_mode_with_full_sync_and_foreign_keys(tmp_path):
    with FeedbackStore(None, tmp_path) as store:
        with store.db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (tmp_path / "feedback.db").is_file()
        assert store.integrity_check() == "ok"


def test_from_settings_reads_the_data_dir_limits_and_database_url(tmp_path, monkeypatch):
    monkeypatch.delenv("MMDEMO_DATABASE_URL", raising=False)
    settings = Settings(data_dir=tmp_path / "d", max_upload_mb=1)
    with FeedbackStore.from_settings(settings) as store:
        assert store.db.backend == "sqlite"
        assert Path(store.db.url.database) == (tmp_path / "d" / "feedback.db").resolve()
        assert store.media.limits.max_upload_bytes == settings.max_upload_bytes
    monkeypatch.setenv("MMDEMO_DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    with FeedbackStore.from_settings(settings) as store:
        assert Path(store.db.url.database) == tmp_path / "other.db"


def test_unreachable_or_unsupported_database_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not available"):
        FeedbackStore("postgresql://nobody@127.0.0.1:1/none", tmp_path)
    with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
        FeedbackStore("mysql://x@localhost/db", tmp_path)


# --- outputs and feedback ---------------------------------------------------------------------------


def test_record_and_rate_a_caption_keeps_everything_a_training_job_needs(store):
    output_id = caption_output(store, 1, settings={"max_new_tokens": 20}, session="alice")
    assert len(output_id) == 32 and int(output_id, 16) >= 0
    saved = store.add_feedback(output_id, annotator="alice", thumbs=-1, correction="  a cat on a mat ",
                               comment="it missed the mat")
    assert saved.created and saved.message == f"Saved #{saved.id}"
    record = store.get(saved.id)
    assert (record.thumbs, record.correction, record.comment) == (-1, "a cat on a mat", "it missed the mat")
    out = record.output
    assert (out.task, out.model_id, out.model_revision, out.backend) == ("image-to-text", "tiny-blip", "abc123",
                                                                         "transformers")
    assert out.model_info["device"] == "cpu"
    assert out.settings == {"max_new_tokens": 20}
    assert out.output == {"text": "caption 1"}
    assert out.session == "alice" and out.app_version and record.app_version
    assert record.created_at.tzinfo is not None and abs(record.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert len(out.input_media) == 1 and store.media_path(out.input_media[0]).is_file()


def test_saving_twice_updates_one_record(store):
    output_id = caption_output(store)
    first = store.add_feedback(output_id, annotator="alice", thumbs=1)
    again = store.add_feedback(output_id, annotator="alice", thumbs=1)
    edited = store.add_feedback(output_id, annotator="alice", correction="better caption")
    assert (first.created, again.created, edited.created) == (True, False, False)
    assert first.id == again.id == edited.id
    record = store.get(first.id)
    assert record.thumbs == 1 and record.correction == "better caption"  # None keeps the earlier thumbs
    other = store.add_feedback(output_id, annotator="bob", thumbs=-1)
    assert other.created and other.id != first.id
    assert store.count() == 2


@pytest.mark.parametrize("task, inputs, output, correction, stored", [
    ("visual-question-answering", {"question": "What colour?"}, {"answer": "red", "answers": []}, " blue ", "blue"),
    ("zero-shot-image-classification", {"labels": "cat, dog, bird"},
     {"labels": [{"label": "cat", "score": 0.7}, {"label": "dog", "score": 0.3}]}, ["dog", "a fox"], ["dog", "a fox"]),
    ("zero-shot-image-classification", {"labels": ["cat", "dog"]},
     {"labels": [{"label": "cat", "score": 0.7}]}, "dog, bird", ["dog", "bird"]),
])
def test_each_image_task_takes_its_correction(store, task, inputs, output, correction, stored):
    output_id = store.record_output(task, inputs={"image": image(3), **inputs}, output={**output, "model": MODEL})
    saved = store.add_feedback(output_id, annotator="alice", correction=correction)
    assert store.get(saved.id).correction == stored
    if task == "zero-shot-image-classification":
        assert store.get_output(output_id).inputs["labels"] in (["cat", "dog", "bird"], ["cat", "dog"])


def test_record_result_splits_a_task_request_into_inputs_and_settings(store):
    request = {"image": image(4), "labels": "cat, dog", "template": None, "multi_label": True,
               "progress": lambda done, total: None}
    result = {"labels": [{"label": "dog", "score": 0.9}], "model": MODEL, "seconds": 0.01}
    out = store.get_output(store.record_result("zero-shot-image-classification", request, result, session="anon-1"))
    assert out.inputs == {"labels": ["cat", "dog"]}
    assert out.settings == {"multi_label": True}
    assert out.model_id == "tiny-blip" and out.session == "anon-1"


def test_speech_keeps_the_audio_as_uploaded(store, tmp_path):
    upload = wav_bytes()
    output_id = store.record_output("automatic-speech-recognition", inputs={"audio": upload, "language": "en"},
                                    output={"text": "hello", "language": "en"})
    out = store.get_output(output_id)
    assert out.input_media[0].endswith(".wav")
    assert store.media_path(out.input_media[0]).read_bytes() == upload
    saved = store.add_feedback(output_id, annotator="bob", correction="hello there")
    assert store.get(saved.id).correction == "hello there"
    # gradio's (rate, samples) becomes FLAC; a file path is read as uploaded
    rate_samples = store.record_output("automatic-speech-recognition",
                                       inputs={"audio": (16000, (np.ones(1600) * 0.2).astype(np.float32))},
                                       output={"text": "x"})
    assert store.get_output(rate_samples).input_media[0].endswith(".flac")
    path = tmp_path / "clip.wav"
    path.write_bytes(upload)
    from_path = store.record_output("automatic-speech-recognition", inputs={"audio": str(path)}, output={"text": "x"})
    assert store.get_output(from_path).input_media == out.input_media  # same bytes, same file


def test_text_to_image_ratings_and_preference(store):
    output_id = t2i_output(store, count=3)
    out = store.get_output(output_id)
    assert len(out.output_media) == 3 and out.input_media == ()
    assert out.inputs == {"prompt": "a red bicycle", "negative_prompt": "blurry"}
    assert out.output == {"seed": 7}
    saved = store.add_feedback(output_id, annotator="carol", correction={"image_ratings": [5, None, 2], "preferred": 0})
    assert store.get(saved.id).correction == {"image_ratings": [5, None, 2], "preferred": 0}
    bad = [
        {"image_ratings": [5, 2]},                       # one per image
        {"image_ratings": [6, 1, 1]},                    # 1-5
        {"image_ratings": [True, 1, 1]},
        {"preferred": 3},                                # index out of range
        {"preferred": None, "image_ratings": [None, None, None]},  # empty
        {"best": 1},                                     # unknown key
        "image 1",
    ]
    for correction in bad:
        with pytest.raises(InvalidFeedbackError):
            store.add_feedback(output_id, annotator="dave", correction=correction)
    single = t2i_output(store, count=1, prompt="one")
    with pytest.raises(InvalidFeedbackError, match="several images"):
        store.add_feedback(single, annotator="dave", correction={"preferred": 0})
    assert store.count() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"correction": ""}, "empty"),
    ({"correction": "   "}, "empty"),
    ({"correction": "x" * (1024 * 1024)}, "1.0 MB; the limit is 64 KB"),
    ({"correction": ["a"]}, "must be text"),
    ({"thumbs": 2}, "rating must be"),
    ({"thumbs": True}, "rating must be"),
    ({"comment": "c" * 5000}, "comment"),
    ({}, "Nothing to save"),
    ({"thumbs": 1, "annotator": ""}, "annotator"),
    ({"thumbs": 1, "annotator": "bad\nname"}, "annotator"),
])
def test_bad_feedback_is_refused_and_nothing_is_written(local_store, kwargs, message):
    output_id = caption_output(local_store)
    kwargs.setdefault("annotator", "alice")
    with pytest.raises(InvalidFeedbackError, match=message):
        local_store.add_feedback(output_id, **kwargs)
    assert local_store.count() == 0


def test_correction_just_under_the_limit_is_kept(local_store):
    output_id = caption_output(local_store)
    text = "é" * (MAX_CORRECTION_BYTES // 2)  # two bytes each: exactly the limit
    saved = local_store.add_feedback(output_id, annotator="alice", correction=text)
    assert local_store.get(saved.id).correction == text


def test_unknown_malformed_and_expired_output_ids(make_store):
    store = make_store(output_ttl_days=1e-9)  # outputs expire at once
    for bad in ("0" * 32, "not-an-id", "../../etc/passwd", None, 123):
        with pytest.raises(UnknownOutputError, match="Unknown output id"):
            store.add_feedback(bad, annotator="alice", thumbs=1)
    output_id = caption_output(store)
    time.sleep(0.01)
    with pytest.raises(ExpiredOutputError, match="expired"):
        store.add_feedback(output_id, annotator="alice", thumbs=1)
    assert isinstance(ExpiredOutputError("x"), UnknownOutputError)
    assert store.count() == 0


def test_unknown_task_and_bad_inputs_write_nothing(store):
    for task in ("image-captioning", "", None):
        with pytest.raises(UnknownTaskError, match="Unknown task .*Tasks: image-to-text"):
            store.record_output(task, inputs={"image": image()}, output={"text": "x"})
    with pytest.raises(InvalidInputError, match="question"):
        store.record_output("visual-question-answering", inputs={"image": image()}, output={"answer": "x"})
    with pytest.raises(InvalidInputError, match="unexpected: max_new_tokens"):
        store.record_output("image-to-text", inputs={"image": image(), "max_new_tokens": 3}, output={"text": "x"})
    with pytest.raises(InvalidInputError, match="'text'"):
        store.record_output("image-to-text", inputs={"image": image()}, output={"caption": "x"})
    with pytest.raises(InvalidInputError, match="cannot be stored"):
        store.record_output("image-to-text", inputs={"image": image()}, output={"text": "x", "score": float("nan")})
    with pytest.raises(InvalidInputError, match="needs its input image"):
        store.record_output("image-to-text", inputs={}, output={"text": "x"})
    with pytest.raises(InvalidInputError):
        store.record_output("image-to-text", inputs={"image": b"not an image"}, output={"text": "x"})
    assert row_counts(store) == {"outputs": 0, "feedback": 0, "media": 0, "output_media": 0}
    assert media_files(store) == []


def test_oversized_uploads_are_refused_before_anything_is_written(make_store, tmp_path):
    store = make_store(limits=MediaLimits(max_upload_bytes=20_000, max_audio_seconds=1.0))
    big = tmp_path / "big.png"
    ms.noise_image((200, 200)).save(big)  # about 120 KB of noise
    with pytest.raises(ImageTooLargeError):
        store.record_output("image-to-text", inputs={"image": big}, output={"text": "x"})
    with pytest.raises(AudioTooLongError):
        store.record_output("automatic-speech-recognition", inputs={"audio": wav_bytes(seconds=2.0)},
                            output={"text": "x"})
    with pytest.raises(InvalidAudioError):
        store.record_output("automatic-speech-recognition", inputs={"audio": b"RIFF....not audio"},
                            output={"text": "x"})
    # a text-to-image batch with one image too many pixels: nothing of the batch is stored
    small = make_store(limits=MediaLimits(max_image_pixels=32 * 32))
    with pytest.raises(ImageTooLargeError):
        small.record_output("text-to-image", inputs={"prompt": "p"},
                            output={"images": [image(1), image(2, size=64)]})
    assert row_counts(store) == {"outputs": 0, "feedback": 0, "media": 0, "output_media": 0}
    assert media_files(store) == []


# --- media ------------------------------------------------------------------------------------------


def test_path_like_upload_names_never_reach_the_file_system(local_store, tmp_path):
    nested = tmp_path / "uploads" / "a" / "b"
    nested.mkdir(parents=True)
    image(9).save(tmp_path / "uploads" / "x.png")
    traversal = str(nested / ".." / ".." / "x.png")  # what a "../../x.png" upload name resolves to
    output_id = local_store.record_output("image-to-text", inputs={"image": traversal}, output={"text": "x"})
    ref = local_store.get_output(output_id).input_media[0]
    assert "/" not in ref and ".." not in ref and ref.endswith(".png")
    path = local_store.media_path(ref)
    assert path.resolve().is_relative_to(local_store.media.root.resolve())
    audio = local_store.record_output("automatic-speech-recognition",
                                inputs={"audio": {"path": "../../x.wav", "bytes": wav_bytes()}}, output={"text": "x"})
    assert local_store.get_output(audio).input_media[0].endswith(".wav")
    with pytest.raises(InvalidInputError, match="could not be found"):  # a name that leads nowhere
        local_store.record_output("image-to-text", inputs={"image": "../../x.png"}, output={"text": "x"})
    for bad in ("../../x.png", "/etc/passwd", "a" * 64 + ".png/../../x", "A" * 64 + ".png", "a" * 64 + ".exe", ""):
        with pytest.raises(InvalidMediaRefError):
            local_store.media_path(bad)
    outside = [p for p in (tmp_path / "data").rglob("*") if p.is_file()
               and not p.resolve().is_relative_to(local_store.media.root.resolve())]
    assert all(p.name.startswith("feedback.db") for p in outside)


def test_exif_and_gps_are_stripped_before_storage(local_store, tmp_path):
    jpeg = ms.write_exif_jpeg(tmp_path)
    assert Image.open(jpeg).getexif()  # the upload has EXIF with a GPS position
    output_id = local_store.record_output("image-to-text", inputs={"image": jpeg}, output={"text": "x"})
    stored = Image.open(local_store.media_path(local_store.get_output(output_id).input_media[0]))
    assert stored.format == "PNG"
    assert not stored.getexif() and "exif" not in stored.info and not stored.info.get("icc_profile")
    assert stored.size == (40, 80)  # EXIF orientation applied before the tag went
    assert b"GPS" not in local_store.media_path(local_store.get_output(output_id).input_media[0]).read_bytes()


def test_an_image_uploaded_a_hundred_times_is_one_file(local_store, tmp_path):
    png, bmp = tmp_path / "same.png", tmp_path / "same.bmp"
    image(5).save(png)
    image(5).save(bmp)
    ids = [local_store.record_output("image-to-text", inputs={"image": src}, output={"text": f"c{i}"})
           for i, src in enumerate([png, bmp, image(5)] * 34)]
    refs = {local_store.get_output(i).input_media[0] for i in ids}
    assert len(refs) == 1 and len(media_files(local_store)) == 1
    assert row_counts(local_store)["media"] == 1 and row_counts(local_store)["outputs"] == 102


def test_media_is_written_atomically_and_durably(local_store, monkeypatch):
    """A file appears under its final name only complete, via a temp file, fsync and rename."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", Path(a).name, Path(b).name)),
                                                      real_replace(a, b))[1])
    prepared = local_store.media.prepare_image(image(77))
    assert local_store.media.write(prepared) is True
    replace = next(i for i, c in enumerate(calls) if isinstance(c, tuple))
    assert calls[replace - 1] == "fsync" and calls[replace + 1] == "fsync"  # file, then folder
    assert calls[replace][1].startswith(".tmp-") and calls[replace][2] == prepared.ref
    assert local_store.media.write(prepared) is False  # already there
    assert not [p for p in media_files(local_store) if p.name.startswith(".tmp-")]


# --- deleting ---------------------------------------------------------------------------------------


def test_only_an_admin_deletes_and_unshared_media_go_with_the_record(store):
    shared_a = caption_output(store, 1)
    shared_b = store.record_output("visual-question-answering", inputs={"image": image(1), "question": "q?"},
                                   output={"answer": "a"})
    alone = caption_output(store, 2)
    a = store.add_feedback(shared_a, annotator="alice", thumbs=1)
    store.add_feedback(shared_b, annotator="alice", thumbs=1)
    c = store.add_feedback(alone, annotator="alice", thumbs=1)
    with pytest.raises(PermissionDeniedError):
        store.delete_feedback(a.id, actor_role="annotator")
    assert len(media_files(store)) == 2
    deleted = store.delete_feedback(c.id, actor_role="admin")
    assert deleted.feedback_ids == (c.id,) and deleted.output_ids == (alone,) and len(deleted.media_refs) == 1
    assert len(media_files(store)) == 1
    deleted = store.delete_feedback(a.id, actor_role="admin")  # the image is still used by shared_b
    assert deleted.media_refs == () and len(media_files(store)) == 1
    with pytest.raises(RecordNotFoundError):
        store.get(a.id)
    with pytest.raises(RecordNotFoundError):
        store.delete_feedback(a.id, actor_role="admin")
    with pytest.raises(UnknownOutputError):
        store.get_output(shared_a)
    assert store.count() == 1


def test_deleting_one_of_two_records_on_an_output_keeps_the_output(store):
    output_id = caption_output(store)
    a = store.add_feedback(output_id, annotator="alice", thumbs=1)
    store.add_feedback(output_id, annotator="bob", thumbs=-1)
    assert store.delete_feedback(a.id, actor_role="admin").output_ids == ()
    assert store.get_output(output_id).id == output_id and len(media_files(store)) == 1
    deleted = store.delete_output(output_id, actor_role="admin")
    assert deleted.output_ids == (output_id,) and len(deleted.feedback_ids) == 1
    assert store.count() == 0 and media_files(store) == []
    assert row_counts(store) == {"outputs": 0, "feedback": 0, "media": 0, "output_media": 0}


def test_purge_expired_outputs_keeps_the_rated_ones(make_store):
    store = make_store(output_ttl_days=1e-9)
    unrated = [caption_output(store, i) for i in range(3)]
    store.output_ttl = timedelta(days=30)
    rated = caption_output(store, 10)
    store.add_feedback(rated, annotator="alice", thumbs=1)
    time.sleep(0.01)
    assert store.purge_expired_outputs(batch_size=2) == 3
    for output_id in unrated:
        with pytest.raises(UnknownOutputError):
            store.get_output(output_id)
    assert store.get_output(rated) and len(media_files(store)) == 1


def test_sweep_removes_orphan_files_only(store):
    kept = store.get_output(caption_output(store)).input_media[0]
    orphan = store.media.prepare_image(image(99))
    store.media.write(orphan)  # as if the process died before its record was committed
    assert store.sweep_media(older_than=3600) == []  # too young: it may be about to be committed
    assert store.sweep_media(older_than=-1) == [orphan.ref]
    assert store.media_path(kept).is_file()


def test_a_delete_between_writing_media_and_committing_its_record_loses_no_file(store, monkeypatch):
    """The media file of a new output is written before its transaction; if an admin deletes the
    only other output using that image in between, the new output must still get its file."""
    first = caption_output(store, 5)
    real_write = store.media.write
    calls = []

    def write_then_delete(media):
        written = real_write(media)
        if not calls:
            calls.append(media.ref)
            assert store.delete_output(first, actor_role="admin").media_refs == (media.ref,)
        return written

    monkeypatch.setattr(store.media, "write", write_then_delete)
    second = caption_output(store, 5)
    ref = store.get_output(second).input_media[0]
    assert calls == [ref] and store.media_path(ref).is_file()


def test_recording_and_deleting_the_same_image_at_once_never_loses_a_file(store):
    """Outputs that share one image are recorded while others are deleted: every output left
    must still find its file."""
    stop = time.monotonic() + 1.0
    errors: list[Exception] = []

    def record_and_delete(worker: int):
        try:
            while time.monotonic() < stop:
                output_id = caption_output(store, 7)
                if worker % 2:
                    store.delete_output(output_id, actor_role="admin")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(record_and_delete, range(6)))
    assert errors == []
    with store.db.read() as conn:
        refs = set(conn.exec_driver_sql("SELECT media_ref FROM output_media").scalars())
    assert refs and all(store.media_path(ref).is_file() for ref in refs)


# --- reading ----------------------------------------------------------------------------------------


def test_iter_records_streams_in_batches_with_filters(store):
    ids = [caption_output(store, i) for i in range(7)]
    store.add_feedback(ids[0], annotator="a", thumbs=1)
    store.add_feedback(ids[1], annotator="a", thumbs=-1)
    store.add_feedback(ids[2], annotator="a", correction="fixed")
    store.add_feedback(ids[3], annotator="a", comment="just a comment")
    for i in ids[4:]:
        store.add_feedback(i, annotator="a", thumbs=1, correction="also fixed")
    vqa = store.record_output("visual-question-answering", inputs={"image": image(1), "question": "q"},
                              output={"answer": "a"})
    store.add_feedback(vqa, annotator="a", thumbs=1)
    assert [r.output_id for r in store.iter_records("image-to-text", batch_size=2)] == ids
    assert store.count("image-to-text", only="corrected") == 4
    assert store.count("image-to-text", only="approved") == 5
    assert store.count(only="approved") == 6 and store.count() == 8
    assert len(list(store.iter_records("image-to-text", only="corrected", batch_size=3))) == 4
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date()
    assert store.count(since=tomorrow) == 0 and store.count(since="2000-01-01") == 8
    with pytest.raises(InvalidInputError):
        store.count(only="everything")
    with pytest.raises(InvalidInputError):
        store.count(since="yesterday")


# --- concurrency ------------------------------------------------------------------------------------


def test_64_parallel_submissions_give_64_records(store):
    output_ids = [caption_output(store, i) for i in range(64)]

    def submit(i):
        return store.add_feedback(output_ids[i], annotator=f"user{i}", thumbs=-1, correction=f"caption {i}!")

    with ThreadPoolExecutor(64) as pool:
        saved = list(pool.map(submit, range(64)))
    assert len({s.id for s in saved}) == 64 and all(s.created for s in saved)
    assert store.count() == 64
    assert {r.correction for r in store.iter_records()} == {f"caption {i}!" for i in range(64)}


def test_64_parallel_repeats_of_one_submission_stay_one_record(store):
    output_id = caption_output(store)
    with ThreadPoolExecutor(64) as pool:
        saved = list(pool.map(lambda i: store.add_feedback(output_id, annotator="alice", thumbs=1,
                                                             correction="same"), range(64)))
    assert len({s.id for s in saved}) == 1 and sum(s.created for s in saved) == 1
    assert store.count() == 1


def test_bad_writes_among_good_ones_fail_alone(store):
    """Writes committed together (SQLite group commit) do not take each other down."""
    output_id = caption_output(store)
    others = [caption_output(store, i) for i in range(1, 33)]

    def submit(i):
        if i % 2:
            return store.add_feedback(output_id, annotator=f"u{i}", correction="")  # refused
        return store.add_feedback(others[i // 2], annotator=f"u{i}", thumbs=1)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(submit, i) for i in range(64)]
    results = [f.exception() or f.result() for f in futures]
    assert sum(isinstance(r, InvalidFeedbackError) for r in results) == 32
    assert store.count() == 32


def test_anonymous_annotator_is_stable_and_hides_the_session_id():
    a = anonymous_annotator("session-secret-123")
    assert a == anonymous_annotator("session-secret-123") != anonymous_annotator("other")
    assert a.startswith("anon-") and "secret" not in a


def test_closing_after_a_write_is_quick(tmp_path):
    """A closed store checkpoints its WAL; idle pooled connections once made that wait 30 s."""
    cat = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"
    store = FeedbackStore(None, tmp_path / "data")
    output_id = store.record_result("image-to-text", {"image": str(cat)}, {"text": "a cat"})
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 5
    with FeedbackStore(None, tmp_path / "data") as reopened:
        assert reopened.get_output(output_id).output["text"] == "a cat"
