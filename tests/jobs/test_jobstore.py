"""Recording lines' results in the job store (`jobs.store`), against a real Redis."""

from __future__ import annotations

import json

import pytest

from jobs.eval_store import EvalStore
from jobs.store import JobStore, LineResult
from jobs.tenancy import UnknownCursor


def _job(store: JobStore, pending: dict[str, int], status: str = "in_progress") -> str:
    job_id = store.create("batch", "owner", {"status": status, "total": sum(pending.values())})
    store.add_pending(job_id, pending)
    return job_id


def test_many_lines_in_one_write_each_once(redis_db):
    store = JobStore(redis_db, "t")
    job_id = _job(store, {"a": 4, "b": 1})
    stored = store.record_lines(job_id, [
        LineResult(1, ["a"], True, {"n": 1}),
        LineResult(2, ["a"], False, {"n": 2}),
        LineResult(1, ["a"], True, {"n": "again"}),  # the same line twice: the second refused
        LineResult(3, ["a", "b"], True, {"n": 3}, {"passed": 1}),
    ])
    assert stored == [True, True, False, True]
    job = store.get(job_id)
    assert (job["completed"], job["failed"]) == (2, 1)
    assert json.loads(store.redis.hget(store.key(job_id, "out"), 1)) == {"n": 1}
    assert json.loads(store.redis.hget(store.key(job_id, "err"), 2)) == {"n": 2}
    # Line 3 needed both models: it left both queues. One line of "a" is still waiting.
    assert store.pending() == {"a": 1}
    assert store.tally(job_id) == {"passed": 1}
    assert store.done_lines(job_id, [1, 2, 3, 4, 5]) == {1, 2, 3}
    # A redelivered chunk stores nothing twice and counts nothing twice.
    assert store.record_lines(job_id, [LineResult(3, ["a", "b"], True, {"n": 3}, {"passed": 1}),
                                       LineResult(4, ["a"], True, {"n": 4})]) == [False, True]
    assert store.get(job_id)["completed"] == 3
    assert store.tally(job_id) == {"passed": 1}
    assert store.pending() == {}


def test_a_finalizing_job_takes_no_more_lines(redis_db):
    store = JobStore(redis_db, "t")
    job_id = _job(store, {"a": 2})
    assert store.record_lines(job_id, [LineResult(1, ["a"], True, {"n": 1})]) == [True]
    store.transition(job_id, ("in_progress",), "finalizing")
    assert store.record_lines(job_id, [LineResult(2, ["a"], True, {"n": 2})]) == [False]
    assert store.done_lines(job_id, [1, 2]) == {1}
    assert store.get(job_id)["completed"] == 1


def test_a_job_starts_once_however_often_its_preparation_runs(redis_db):
    """Fields, queue depth and status in one step: a validation message delivered twice (or
    sent again by the sweep while the first still runs) counts the lines once."""
    store = JobStore(redis_db, "t")
    job_id = store.create("batch", "owner", {"status": "validating", "total": 0})
    fields = {"total": 3, "chunks_total": 1, "chunks": [[0, 3, 0]]}
    assert store.start(job_id, ("validating",), "in_progress", "in_progress_at", fields,
                       {"a": 2, "b": 1})
    assert not store.start(job_id, ("validating",), "in_progress", "in_progress_at", fields,
                           {"a": 2, "b": 1})
    assert store.pending() == {"a": 2, "b": 1}
    job = store.get(job_id)
    assert (job["status"], job["total"], job["chunks"]) == ("in_progress", 3, [[0, 3, 0]])
    assert job["in_progress_at"] is not None

    cancelled = store.create("batch", "owner", {"status": "cancelling", "total": 0})
    assert not store.start(cancelled, ("validating",), "in_progress", "in_progress_at", fields,
                           {"a": 5})
    assert store.pending() == {"a": 2, "b": 1}  # nothing of the cancelled one
    assert store.get(cancelled).get("chunks") is None


def test_jobs_of_a_project_are_found_only_from_it(redis_db):
    store = JobStore(redis_db, "t")
    mine = store.create("batch", "key-a", {"status": "queued"}, project="a")
    theirs = store.create("batch", "key-b", {"status": "queued"}, project="b")
    assert store.get(mine, "a")["owner"] == "key-a"
    assert store.get(mine, "b") is None and store.get(mine)["project"] == "a"
    assert [j["id"] for j in store.list("batch", "a", None, 10)[0]] == [mine]
    assert {j["id"] for j in store.list("batch", None, None, 10)[0]} == {mine, theirs}
    with pytest.raises(UnknownCursor):
        store.list("batch", "a", theirs, 10)  # another project's id is no cursor here
    store.delete(mine)
    assert store.list("batch", "a", None, 10)[0] == []


def test_jobs_and_evals_from_before_projects_go_to_default(redis_db):
    store, evals = JobStore(redis_db, "t"), EvalStore(redis_db, "t")
    # As an older release stored them: no project field, no project index.
    redis_db.hset("t:job:batch_old", mapping={"id": "batch_old", "kind": "batch",
                                               "owner": "k", "status": "completed"})
    redis_db.zadd("t:jobs:batch", {"batch_old": 1.0})
    redis_db.set("t:eval:eval_old", json.dumps({"id": "eval_old", "owner": "k", "name": "e"}))
    redis_db.zadd("t:evals", {"eval_old": 1.0})
    assert store.get("batch_old", "default")["project"] == "default"  # reads as default
    assert store.adopt_unprojected() == 1 and evals.adopt_unprojected() == 1
    assert store.adopt_unprojected() == 0 and evals.adopt_unprojected() == 0  # idempotent
    assert [j["id"] for j in store.list("batch", "default", None, 10)[0]] == ["batch_old"]
    assert [e["id"] for e in evals.list("default", None, 10, "asc")[0]] == ["eval_old"]
    assert evals.get("eval_old", "other") is None
