"""The fine-tuning jobs table on SQLite and PostgreSQL: the queue's order, one claim per job, the job's own
reports only while it runs, one final state."""

from __future__ import annotations

import pytest

from mmdemo.feedback import StoreError
from mmdemo.feedback.finetune_jobs import FinetuneJobStore


@pytest.fixture
def jobs(store_on_each_database) -> FinetuneJobStore:
    return FinetuneJobStore(store_on_each_database)


def test_jobs_queue_in_order_and_each_is_claimed_once(jobs):
    config = {"task": "image-to-text", "base": "tiny-blip-caption", "name": "a", "epochs": 2}
    first = jobs.create("a", "image-to-text", "tiny-blip-caption", "cpu", config, created_by="alice")
    second = jobs.create("b", "image-to-text", "tiny-blip-caption", "cpu", {**config, "name": "b"})
    assert (first.state, first.config, first.created_by, first.pid) == ("pending", config, "alice", None)
    assert [job.name for job in jobs.list(states=("pending",))] == ["a", "b"]

    assert jobs.claim(first.id, pid=None, host="web-1", log_path="/logs/a.log")
    assert not jobs.claim(first.id, pid=None, host="web-2", log_path="/logs/a.log")  # another replica lost
    jobs.set_pid(first.id, 4242)
    jobs.report(first.id, {"stage": "training", "step": 3, "total_steps": 10, "train_loss": 1.5})
    running = jobs.get(first.id)
    assert (running.state, running.pid, running.host, running.progress["step"]) == ("running", 4242, "web-1", 3)
    assert running.started_at is not None and running.started_at.tzinfo is not None

    assert jobs.finish(first.id, "succeeded", result={"model": "a"}, progress={"stage": "done"})
    assert not jobs.finish(first.id, "failed", error="too late")  # a job ends once
    jobs.report(first.id, {"stage": "training"})  # a report after the end changes nothing
    done = jobs.get(first.id)
    assert (done.state, done.result, done.progress, done.error) == ("succeeded", {"model": "a"}, {"stage": "done"}, None)
    jobs.set_exit_code(first.id, 0)
    jobs.set_exit_code(first.id, -9)  # the first exit code recorded stays
    assert jobs.get(first.id).exit_code == 0

    assert [job.name for job in jobs.list(states=("pending", "running"))] == ["b"]
    assert jobs.latest().id == second.id and [job.name for job in jobs.list()] == ["a", "b"]
    with pytest.raises(StoreError, match="no fine-tuning job 'nope'"):
        jobs.get("nope")
