"""Nothing acknowledged is lost: a process saving feedback is killed with SIGKILL mid-stream; every
record it reported saved is there afterwards, the database passes SQLite's integrity check, and
every media file under its final name is complete."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from mmdemo.feedback import FeedbackStore

# Four threads record an output with its own image and save a correction on it, in a loop, and print
# "record_id output_id n" once add_feedback has returned (that is: once the UI would say "Saved").
WRITER = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from PIL import Image
    from mmdemo.feedback import FeedbackStore

    store = FeedbackStore(None, Path(sys.argv[1]))
    start = int(sys.argv[2])
    lock = threading.Lock()

    def writer(w):
        n = start + w
        while True:
            img = Image.new("RGB", (24, 24), (n % 256, (n // 256) % 256, 3))
            output_id = store.record_output("image-to-text", inputs={"image": img},
                                            output={"text": f"model {n}"})
            saved = store.add_feedback(output_id, annotator=f"w{w}", thumbs=-1, correction=f"caption {n}")
            with lock:
                print(saved.id, output_id, n, flush=True)
            n += 4

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()
""")


def run_and_kill(data_dir: Path, start: int, acknowledged: int) -> list[tuple[int, str, int]]:
    """Start the writer, let it acknowledge at least ``acknowledged`` records, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saved: list[tuple[int, str, int]] = []
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        while len(saved) < acknowledged and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            record_id, output_id, n = line.split()
            saved.append((int(record_id), output_id, int(n)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    rest = proc.stdout.read()  # lines printed before the kill landed were acknowledged too
    for line in rest.splitlines():
        if len(line.split()) == 3:
            record_id, output_id, n = line.split()
            saved.append((int(record_id), output_id, int(n)))
    assert proc.returncode == -signal.SIGKILL
    assert len(saved) >= acknowledged, proc.stderr.read()
    return saved


def test_acknowledged_records_survive_sigkill(tmp_path):
    data_dir = tmp_path / "data"
    everything: list[tuple[int, str, int]] = []
    for round_, start in enumerate((0, 100_000, 200_000)):  # the store reopens after each crash
        everything += run_and_kill(data_dir, start, acknowledged=40 + 30 * round_)

        with sqlite3.connect(data_dir / "feedback.db") as conn:  # readable by plain SQLite
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with FeedbackStore(None, data_dir) as store:
            assert store.integrity_check() == "ok"
            for record_id, output_id, n in everything:
                record = store.get(record_id)
                assert record.output_id == output_id and record.correction == f"caption {n}"
                stored = Image.open(store.media_path(record.output.input_media[0]))
                assert stored.getpixel((0, 0)) == (n % 256, (n // 256) % 256, 3)
            assert store.count() >= len(everything)
            for path in store.media.root.rglob("*.png"):  # every file under its final name is whole
                Image.open(path).load()
    assert len({record_id for record_id, _, _ in everything}) == len(everything)


@pytest.mark.parametrize("when", ["before-commit", "after-media"])
def test_a_crash_between_media_and_record_leaves_only_an_orphan_file(tmp_path, when):
    """Media are written before their record; a crash in between leaves a file that no record
    points to, which the sweep removes (and a later upload of the same image reuses)."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from PIL import Image
        from mmdemo.feedback import FeedbackStore
        import mmdemo.feedback.store as store_module

        store = FeedbackStore(None, Path(sys.argv[1]))
        real_run_write = store.db.run_write
        def die(work, on_rollback=None):
            os.kill(os.getpid(), 9)
        store.db.run_write = die if "{when}" == "before-commit" else real_run_write
        if "{when}" == "after-media":
            real_write = store.media.write
            def write_then_die(media):
                real_write(media)
                os.kill(os.getpid(), 9)
            store.media.write = write_then_die
        store.record_output("image-to-text", inputs={{"image": Image.new("RGB", (8, 8), (9, 9, 9))}},
                            output={{"text": "x"}})
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    with FeedbackStore(None, tmp_path) as store:
        assert store.integrity_check() == "ok"
        with store.db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM outputs").scalar_one() == 0
        orphans = [p for p in store.media.root.rglob("*.png")]
        assert len(orphans) == 1
        assert store.sweep_media(older_than=-1) == [orphans[0].name]
