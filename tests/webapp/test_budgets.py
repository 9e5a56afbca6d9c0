"""Budgets through the stack: 50 concurrent calls against a daily budget of about ten calls'
worth of tokens never use more than the budget, the refused ones get a 429 with Retry-After,
none passes after, and the usage endpoint equals what the engine reported; a project's
requests_per_day is shared by its keys."""

from __future__ import annotations

import io
import json
import threading
import time

import urllib3

from tests.conftest import BUDGET_TOKENS, TOKENS, raw_post, sdk, warm
from tests.harness import wait_for
from tests.webapp.test_bad_input import assert_openai_error

BODY = {"model": "sim/fast", "prompt": "spend some tokens", "max_tokens": 12}


def test_concurrent_calls_stay_within_a_daily_token_budget(stack):
    warm(stack, "sim/fast")
    used: list[int] = []
    refused: list[urllib3.BaseHTTPResponse] = []
    lock = threading.Lock()

    def caller():
        pool = urllib3.PoolManager()
        for _ in range(4):  # each keeps calling until refused
            answer = pool.request(
                "POST", f"{stack.base_url}/v1/completions", body=json.dumps(BODY).encode(),
                headers={"Authorization": f"Bearer {TOKENS['budget']}",
                         "Content-Type": "application/json"}, retries=False, timeout=30)
            with lock:
                if answer.status == 200:
                    used.append(answer.json()["usage"]["total_tokens"])
                else:
                    refused.append(answer)
                    return

    threads = [threading.Thread(target=caller) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert used and sum(used) <= BUDGET_TOKENS, (len(used), sum(used))
    assert len(refused) == 50  # every caller met the budget
    for answer in refused:
        error = assert_openai_error(answer, 429)
        assert error["code"] == "budget_exceeded" and "tokens_per_day" in error["message"]
        assert 0 < int(answer.headers["Retry-After"]) <= 86400
    # None after: what is left of the budget is less than a call may take.
    again = raw_post(stack, "/v1/completions", BODY, token="budget")
    assert assert_openai_error(again, 429)["code"] == "budget_exceeded"

    def reported():
        answer = urllib3.request(
            "GET", f"{stack.base_url}/v1/usage?bucket=day&group_by=key&start="
            f"{int(time.time()) - 3600}",
            headers={"Authorization": f"Bearer {TOKENS['budget']}"})
        rows = answer.json()["data"]
        return rows if rows and rows[0]["total_tokens"] == sum(used) else None

    [row] = wait_for(reported, 10, interval=0.3, what="the usage report")
    assert row["key"] == "test-budget" and row["requests"] == len(used)


def test_a_project_budget_is_shared_by_its_keys(stack):
    warm(stack, "sim/fast")
    statuses = [raw_post(stack, "/v1/completions", {**BODY, "max_tokens": 1},
                         token="budget_project").status for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    error = assert_openai_error(raw_post(stack, "/v1/completions", BODY, token="budget_project"))
    assert "project budgeted-project's requests_per_day of 5" in error["message"]


def _batch(stack, token: str, count: int):
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
              "body": {**BODY, "max_tokens": 1}} for i in range(count)]
    uploader = sdk(stack, TOKENS[token])
    file = uploader.files.create(file=("b.jsonl", io.BytesIO(
        b"".join(json.dumps(x).encode() + b"\n" for x in lines))), purpose="batch")
    return uploader, uploader.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                             completion_window="24h")


def test_batch_lines_count_in_the_daily_budget_of_their_key(stack):
    warm(stack, "sim/fast")
    client, batch = _batch(stack, "budget_mixed", 3)
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed"
                    and b, 60, interval=0.2, what="the batch")
    assert done.request_counts.completed == 3
    # Three of the key's four requests of the day are gone: one realtime call is left.
    statuses = [raw_post(stack, "/v1/completions", {**BODY, "max_tokens": 1},
                         token="budget_mixed").status for _ in range(2)]
    assert statuses == [200, 429]


def test_a_batch_waits_while_its_owner_is_over_budget(stack):
    warm(stack, "sim/fast")
    while raw_post(stack, "/v1/completions", {**BODY, "max_tokens": 1},
                   token="budget_project").status == 200:
        pass  # use up the project's requests of the day (if the test above did not)
    client, batch = _batch(stack, "budget_project", 2)

    def waiting():
        got = client.batches.retrieve(batch.id)
        return got if got.status == "in_progress" and got.model_extra.get("waiting_reason") \
            else None

    got = wait_for(waiting, 30, interval=0.3, what="the batch to wait for its budget")
    assert "requests_per_day budget of 5" in got.model_extra["waiting_reason"]
    time.sleep(2)
    assert client.batches.retrieve(batch.id).request_counts.completed == 0  # nothing ran
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
