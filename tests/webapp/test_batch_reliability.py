"""Batch work that must survive: a worker killed with SIGKILL, an engine that crashes, a saturated
worker and priorities, cancel and expiry. Through the real stack, with the openai SDK."""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter

import pytest
import redis as redis_lib

from tests.conftest import TOKENS, raw_post, sdk, warm
from tests.harness import wait_for


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _submit(stack, model: str, count: int, max_tokens: int = 16, **kwargs):
    lines = [{"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": f"line {i}", "max_tokens": max_tokens}}
             for i in range(count)]
    uploaded = sdk(stack, TOKENS["upload"]).files.create(
        file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    client = sdk(stack, TOKENS["batch"])
    return client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                         completion_window="24h", **kwargs)


def _wait(client, batch_id, statuses=("completed", "failed", "cancelled", "expired"),
          timeout=120):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b,
                    timeout, interval=0.3, what=f"batch {batch_id}")


def _custom_ids(client, file_id: str | None) -> Counter:
    if file_id is None:
        return Counter()
    return Counter(json.loads(line)["custom_id"]
                   for line in client.files.content(file_id).text.splitlines())


def test_a_killed_worker_loses_no_line_and_doubles_none(stack):
    warm(stack, "sim/batch")
    client, batch = _submit(stack, "sim/batch", 2000)
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 300, 60,
             interval=0.1, what="the batch to be under way")
    stack.stop_process("batch", sig=signal.SIGKILL)
    stopped_at = client.batches.retrieve(batch.id).request_counts.completed
    assert stopped_at < 2000, "the batch finished before the worker could be killed"
    stack.start_batch_worker("batch")  # a new worker takes over the unacknowledged chunks
    done = _wait(client, batch.id, timeout=180)
    assert done.status == "completed"
    assert done.request_counts.completed == 2000 and done.request_counts.failed == 0
    seen = _custom_ids(client, done.output_file_id)
    assert len(seen) == 2000 and set(seen.values()) == {1}


def test_an_engine_crash_mid_batch_retries_its_lines(stack, registry):
    # The engine dies in the middle of its 150th request, and again after each restart.
    client, batch = _submit(stack, "sim/batch-crashy", 400, max_tokens=8)
    done = _wait(client, batch.id, timeout=180)
    assert done.status == "completed"
    assert done.request_counts.completed == 400 and done.request_counts.failed == 0
    assert set(_custom_ids(client, done.output_file_id).values()) == {1}
    assert any(d["action"] == "mark_failed" and d["model"] == "sim/batch-crashy"
               for d in registry.recent_decisions(500))
    registry.reset_model("sim/batch-crashy")


def test_a_later_job_of_higher_priority_starts_before_waiting_lower_ones(stack):
    warm(stack, "sim/fast")
    stack.stop_process("batch")
    try:
        low = [raw_post(stack, "/v1/batch/completions",
                        {"model": "sim/fast", "prompt": f"low {i}", "max_tokens": 1,
                         "priority": 1}, token="batch").json() for i in range(6)]
        high = raw_post(stack, "/v1/batch/completions",
                        {"model": "sim/fast", "prompt": "urgent", "max_tokens": 1,
                         "priority": 9}, token="batch").json()
        # One worker slot: saturated by the queue. The urgent job goes first all the same.
        stack.start_batch_worker("batch-one", concurrency=1)

        def finished(job):
            status = json_get(stack, job["status_url"])
            return status if status["status"] == "succeeded" else None

        jobs = [wait_for(lambda j=j: finished(j), 60, what="job") for j in [*low, high]]
        urgent = jobs[-1]
        assert all(urgent["started_at"] <= j["started_at"] for j in jobs[:-1]), \
            [(j["priority"], j["started_at"]) for j in jobs]
    finally:
        stack.stop_process("batch-one")
        stack.start_batch_worker("batch")


def json_get(stack, path: str, token: str = "batch") -> dict:
    import urllib3

    return urllib3.request("GET", f"{stack.base_url}{path}", retries=False,
                           headers={"Authorization": f"Bearer {TOKENS[token]}"}).json()


def test_cancel_stops_dispatch_and_keeps_what_finished(stack):
    warm(stack, "sim/slowbatch")  # 4 at a time, 300 ms each: 300 lines take ~25 s
    client, batch = _submit(stack, "sim/slowbatch", 300, max_tokens=1)
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 8, 60,
             interval=0.1, what="some lines done")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, timeout=90)
    assert done.status == "cancelled" and done.cancelled_at is not None
    kept = _custom_ids(client, done.output_file_id)
    assert 8 <= sum(kept.values()) == done.request_counts.completed < 300
    assert set(kept.values()) == {1}


def test_an_expired_batch_reports_its_open_lines(stack, redis_server):
    warm(stack, "sim/slowbatch")
    client, batch = _submit(stack, "sim/slowbatch", 200, max_tokens=1)
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4, 60,
             interval=0.1, what="some lines done")
    # Move the end of the 24 h window to now, as if a day had passed.
    store = redis_lib.Redis.from_url(f"{redis_server.url}/0")
    store.hset(f"gw:job:{batch.id}", "expires_at", int(time.time()) - 1)
    done = _wait(client, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at is not None
    finished = _custom_ids(client, done.output_file_id)
    errors = [json.loads(line) for line in
              client.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sum(finished.values()) + len(errors) == 200
    assert not set(finished) & {e["custom_id"] for e in errors}


def test_a_lost_validation_message_is_sent_again(stack, redis_server):
    """Redis lost the message that validates a batch (a restart without AOF): the sweep finds
    the batch still validating after BATCH_STALL_SECONDS (10 s here) and sends it again."""
    warm(stack, "sim/fast")
    broker = redis_lib.Redis.from_url(f"{redis_server.url}/0")
    stack.stop_process("batch")
    try:
        client, batch = _submit(stack, "sim/fast", 20, max_tokens=1)
        queues = [key for key in broker.scan_iter(match="batch*") if broker.type(key) == b"list"]
        assert queues, "the validation message should wait in the batch queue"
        broker.delete(*queues)  # lost
    finally:
        stack.start_batch_worker("batch")
    time.sleep(3)
    assert client.batches.retrieve(batch.id).status == "validating"  # nothing to run it
    done = _wait(client, batch.id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 20
    assert set(_custom_ids(client, done.output_file_id).values()) == {1}


@pytest.mark.parametrize("priority", [-1, 10, "x"])
def test_bad_priority_in_batches_is_400(stack, priority):
    import openai

    uploaded = sdk(stack, TOKENS["upload"]).files.create(
        file=("in.jsonl", io.BytesIO(_jsonl([{"custom_id": "a", "method": "POST",
                                              "url": "/v1/completions",
                                              "body": {"model": "sim/fast", "prompt": "x"}}]))),
        purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(stack, TOKENS["batch"]).batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h",
            extra_body={"priority": priority})
    assert caught.value.body["param"] == "priority"
