"""Usage buckets against a real Redis: sums by time bucket and group, kept per project and key,
and a batch line's usage counted once however often its result is stored."""

from __future__ import annotations

import pytest

from jobs.dispatch import Dispatcher
from jobs.files import FileStore
from jobs.kinds import BatchFileKind
from jobs.limits import BatchLimits
from jobs.store import JobStore, LineResult
from runtimes.catalog import ModelCatalog
from runtimes.registry import RuntimeRegistry
from runtimes.routing import RuntimeRouter
from services.usage_ledger import UsageKey, UsageLedger, line_counts, usage_in

T0 = 1_700_000_000 // 86400 * 86400  # the start of a day


def test_buckets_sum_by_time_and_group(redis_db):
    ledger = UsageLedger(redis_db, "t")
    alice = UsageKey("alice", "p1", "m1", "realtime")
    bob = UsageKey("bob", "p1", "m2", "batch")
    carol = UsageKey("carol", "p2", "m1", "realtime")
    ledger.add({alice: [2, 10, 5], bob: [1, 7, 3]}, T0 + 30)
    ledger.add({alice: [1, 4, 1], carol: [1, 100, 100]}, T0 + 90)  # the next minute
    by_minute = ledger.query(T0, T0 + 3600, "minute", "key", project="p1")
    assert [(r["start"], r["key"], r["requests"], r["total_tokens"]) for r in by_minute] == [
        (T0, "alice", 2, 15), (T0, "bob", 1, 10), (T0 + 60, "alice", 1, 5)]
    by_hour = ledger.query(T0, T0 + 3600, "hour", "model", project="p1")
    assert [(r["model"], r["prompt_tokens"], r["completion_tokens"]) for r in by_hour] == [
        ("m1", 14, 6), ("m2", 7, 3)]
    by_day = ledger.query(T0, T0 + 86400, "day", "project")
    assert {r["project"]: r["requests"] for r in by_day} == {"p1": 4, "p2": 1}
    # One key sees its own rows only; another project's are never in a project's answer.
    assert {r["key"] for r in ledger.query(T0, T0 + 3600, "hour", "key", key="alice")} == {
        "alice"}
    assert all(r["key"] != "carol"
               for r in ledger.query(T0, T0 + 3600, "minute", "key", project="p1"))


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}', (3, 4)),
    (b'{"usage":{"input_tokens":5,"output_tokens":2}}', (5, 2)),
    (b'{"usage":{"prompt_tokens":9,"total_tokens":9}}', (9, 0)),  # embeddings
    (b'{"choices":[]}', None),
    (b'{"usage":null}', None),
    (b'{"usage":', None),
])
def test_usage_in_an_answer(data, expected):
    assert usage_in(data) == expected


def test_a_line_stored_twice_is_counted_once(redis_db, tmp_path):
    jobs = JobStore(redis_db, "t")
    counted: list[dict] = []
    service = Dispatcher(jobs, ModelCatalog([]), RuntimeRouter(RuntimeRegistry(redis_db, "t")),
                         BatchLimits(), {"batch": BatchFileKind(jobs, FileStore(
                             redis_db, tmp_path, "t"))}, close_chunk=lambda job, first: None,
                         on_usage=lambda owner, results: counted.append(
                             line_counts(owner, results)))
    job_id = jobs.create("batch", "dave", {"status": "in_progress"}, "p9")
    service._owners[job_id] = {"owner": "dave", "project": "p9", "kind": "batch"}
    line = LineResult(1, ["m"], True, {"custom_id": "a", "response": {"status_code": 200, "body": {
        "model": "m", "usage": {"prompt_tokens": 6, "completion_tokens": 2}}}})
    service._store(job_id, [line])
    service._store(job_id, [line])  # the line ran again (a redelivered chunk): stored once
    assert counted == [{UsageKey("dave", "p9", "m", "batch"): [1, 6, 2]}]


def test_an_eval_sample_counts_its_sample_and_judge_calls_by_model():
    owner = {"owner": "erin", "project": "p3", "kind": "eval_run"}
    sample = LineResult(1, ["m"], True, {"id": "outputitem_1"}, {
        "usage:m:invocation_count": 1, "usage:m:prompt_tokens": 12,
        "usage:m:completion_tokens": 4, "usage:judge:invocation_count": 2,
        "usage:judge:prompt_tokens": 40, "usage:judge:completion_tokens": 2, "passed": 1})
    assert line_counts(owner, [sample]) == {
        UsageKey("erin", "p3", "m", "eval"): [1, 12, 4],
        UsageKey("erin", "p3", "judge", "eval"): [2, 40, 2]}
