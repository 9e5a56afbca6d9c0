"""A job's lifecycle with a fake task queue (what would be sent is recorded) and a real Redis:
validation, chunks closing into the final state, cancel, expiry and the stall sweep."""

from __future__ import annotations

import json

import pytest

from jobs.files import FileStore
from jobs.kinds import BatchFileKind, CompletionKind
from jobs.lifecycle import JobLifecycle
from jobs.limits import BatchLimits
from jobs.store import JobStore, LineResult
from runtimes.catalog import ModelCatalog
from runtimes.engine_requests import check_engine_body


class RecordingQueue:
    def __init__(self):
        self.chunks: list[tuple] = []
        self.preparations: list[tuple[str, str]] = []

    def send_chunk(self, job_id, first, end, offset, priority, countdown=0):
        self.chunks.append((job_id, first, end, offset, priority))

    def send_preparation(self, kind, job_id):
        self.preparations.append((kind, job_id))


@pytest.fixture
def world(redis_db, tmp_path):
    jobs = JobStore(redis_db, "t")
    files = FileStore(redis_db, tmp_path, "t")
    catalog = ModelCatalog.from_document({"models": [{"id": "m/a"}, {"id": "m/b"}]}, "sim")
    queue = RecordingQueue()
    kinds = {"batch": BatchFileKind(jobs, files), "completion": CompletionKind(jobs)}
    lifecycle = JobLifecycle(jobs, files, catalog, BatchLimits(chunk_lines=2, stall_seconds=60),
                             kinds, queue, check_engine_body)
    return jobs, files, queue, lifecycle


def _batch(world, lines: list, **kwargs) -> dict:
    _jobs, files, _queue, lifecycle = world
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    stored = files.save("key", "batch", "in.jsonl", [b"\n".join(raw) + b"\n"], project="p")
    return lifecycle.create_batch("key", stored.id, "/v1/completions", "24h", None, 3,
                                  project="p", **kwargs)


def _line(i: int, model: str = "m/a") -> dict:
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": "x", "max_tokens": 1}}


def test_a_valid_batch_starts_in_chunks_with_its_priority(world):
    jobs, _, queue, lifecycle = world
    job = _batch(world, [_line(i, "m/a" if i < 3 else "m/b") for i in range(5)])
    assert queue.preparations == [("batch", job["id"])]
    lifecycle.validate(job["id"])
    started = jobs.get(job["id"])
    assert started["status"] == "in_progress" and started["total"] == 5
    assert [(c[1], c[2], c[4]) for c in queue.chunks] == [(0, 2, 3), (2, 4, 3), (4, 5, 3)]
    assert jobs.pending() == {"m/a": 3, "m/b": 2}
    lifecycle.validate(job["id"])  # delivered twice: nothing twice
    assert len(queue.chunks) == 3 and jobs.pending() == {"m/a": 3, "m/b": 2}


def test_bad_lines_fail_the_batch_with_their_numbers(world):
    jobs, _, queue, lifecycle = world
    job = _batch(world, [_line(0), b"{not json", _line(0), {**_line(3), "url": "/v1/x"},
                         _line(4, "no/such"), b"[" * 200 + b"]" * 200],
                 allowed_models=["m/a"])
    lifecycle.validate(job["id"])
    failed = jobs.get(job["id"])
    assert failed["status"] == "failed" and queue.chunks == []
    assert [(e["line"], e["code"]) for e in failed["errors"]["data"]] == [
        (2, "invalid_json"), (3, "duplicate_custom_id"), (4, "invalid_url"),
        (5, "model_not_found"), (6, "invalid_json")]
    assert jobs.open_count() == 0


def test_the_last_chunk_closed_writes_the_files_once(world):
    jobs, files, _queue, lifecycle = world
    job = _batch(world, [_line(i) for i in range(3)])
    lifecycle.validate(job["id"])
    jobs.record_lines(job["id"], [LineResult(1, ["m/a"], True, {"custom_id": "c0"}),
                                  LineResult(2, ["m/a"], False, {"custom_id": "c1"}),
                                  LineResult(3, ["m/a"], True, {"custom_id": "c2"})])
    current = jobs.get(job["id"])
    lifecycle.close_chunk(current, 0)
    assert jobs.get(job["id"])["status"] == "in_progress"  # one chunk of two is closed
    lifecycle.close_chunk(current, 2)
    lifecycle.close_chunk(current, 2)  # a redelivered chunk closes nothing twice
    done = jobs.get(job["id"])
    assert done["status"] == "completed"
    output = files.get(done["output_file_id"], "p")
    errors = files.get(done["error_file_id"], "p")
    assert output.owner == "key" and output.purpose == "batch_output"
    assert [json.loads(x)["custom_id"] for x in b"".join(files.read(output.id)).splitlines()] \
        == ["c0", "c2"]
    assert b"c1" in b"".join(files.read(errors.id))
    assert jobs.pending() == {} and jobs.open_count() == 0


def test_cancel_then_the_sweep_finishes_it_after_the_grace(world):
    jobs, _, _queue, lifecycle = world
    job = _batch(world, [_line(i) for i in range(3)])
    lifecycle.validate(job["id"])
    assert lifecycle.cancel(job["id"])["status"] == "cancelling"
    cancelling_at = jobs.get(job["id"])["cancelling_at"]
    lifecycle.sweep(now=cancelling_at + 10)
    assert jobs.get(job["id"])["status"] == "cancelling"  # lines in flight may still land
    lifecycle.sweep(now=cancelling_at + 61)
    assert jobs.get(job["id"])["status"] == "cancelled"


def test_expiry_writes_the_open_lines_to_the_error_file(world):
    jobs, files, _, lifecycle = world
    job = _batch(world, [_line(i) for i in range(3)])
    lifecycle.validate(job["id"])
    jobs.record_lines(job["id"], [LineResult(1, ["m/a"], True, {"custom_id": "c0"})])
    lifecycle.sweep(now=job["expires_at"] + 1)
    expired = jobs.get(job["id"])
    assert expired["status"] == "expired"
    lines = [json.loads(x) for x in b"".join(files.read(expired["error_file_id"])).splitlines()]
    assert {line["custom_id"] for line in lines} == {"c1", "c2"}
    assert {line["error"]["code"] for line in lines} == {"batch_expired"}


def test_the_sweep_resends_lost_work(world):
    jobs, _, queue, lifecycle = world
    waiting = _batch(world, [_line(0)])  # its validation message was lost
    running = _batch(world, [_line(i) for i in range(3)])
    lifecycle.validate(running["id"])
    lifecycle.close_chunk(jobs.get(running["id"]), 0)
    queue.chunks.clear()
    queue.preparations.clear()
    now = running["created_at"] + 1000
    lifecycle.sweep(now=now)
    assert queue.preparations == [("batch", waiting["id"])]
    assert [(c[0], c[1]) for c in queue.chunks] == [(running["id"], 2)]  # the open chunk only
    lifecycle.sweep(now=now + 1)  # progress_at was moved: not again at once
    assert len(queue.chunks) == 1


def test_a_single_completion_is_one_chunk_and_ends_with_its_answer(world):
    jobs, _, queue, lifecycle = world
    body = {"model": "m/b", "prompt": "x", "max_tokens": 1}
    job = lifecycle.create_completion("key", "/v1/completions", body, 7, project="p")
    assert queue.chunks == [(job["id"], 0, 1, 0, 7)] and jobs.pending() == {"m/b": 1}
    answer = {"response": {"status_code": 200, "body": {"choices": [{"text": "y"}]}}}
    jobs.record_lines(job["id"], [LineResult(1, ["m/b"], True, answer)])
    lifecycle.close_chunk(jobs.get(job["id"]), 0)
    done = jobs.get(job["id"])
    assert done["status"] == "succeeded" and done["response"] == {"choices": [{"text": "y"}]}
    assert lifecycle.cancel(job["id"])["status"] == "succeeded"  # finished: nothing to cancel
