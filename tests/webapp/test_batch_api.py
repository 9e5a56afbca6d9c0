"""Batch work through the real stack: the README's endpoint and the OpenAI Files + Batches API,
with the official openai SDK as the client."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
import urllib3

from tests.conftest import OTHER_TOKENS, TOKENS, raw_post, sdk, warm
from tests.harness import wait_for


def _get(stack, path: str, token: str = "batch"):
    return urllib3.request("GET", f"{stack.base_url}{path}", retries=False,
                           headers={"Authorization": f"Bearer {TOKENS.get(token, token)}"})


def _wait_job(stack, url: str, statuses=("succeeded", "failed", "cancelled"), timeout=60):
    def done():
        job = _get(stack, url).json()
        return job if job["status"] in statuses else None

    return wait_for(done, timeout, interval=0.2, what=f"job {url}")


def test_single_batch_completion_runs_and_reports(stack):
    response = raw_post(stack, "/v1/batch/completions",
                        {"model": "sim/fast", "prompt": "Write a haiku about snow.",
                         "max_tokens": 12, "priority": 1}, token="batch")
    assert response.status == 202
    job = response.json()
    assert job["status"] == "queued" and job["priority"] == 1
    assert job["status_url"] == f"/v1/batch/completions/{job['id']}"
    assert response.headers["Location"].endswith(job["status_url"])
    done = _wait_job(stack, job["status_url"])
    assert done["status"] == "succeeded"
    assert done["result"]["object"] == "text_completion"
    assert done["result"]["usage"]["completion_tokens"] == 12
    assert done["finished_at"] >= done["created_at"]


def test_chat_batch_completion(stack):
    response = raw_post(stack, "/v1/batch/completions",
                        {"model": "sim/fast", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 3}, token="batch")
    assert response.status == 202
    done = _wait_job(stack, response.json()["status_url"])
    assert done["result"]["object"] == "chat.completion"
    assert done["endpoint"] == "/v1/chat/completions"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "sim/fast", "prompt": "x", "priority": 10}, 400, "priority"),
    ({"model": "sim/fast", "prompt": "x", "priority": "high"}, 400, "priority"),
    ({"model": "sim/fast", "prompt": "x", "priority": 1.5}, 400, "priority"),
    ({"model": "sim/fast"}, 400, "prompt"),
    ({"model": "sim/fast", "prompt": "x", "stream": True}, 400, "stream"),
    ({"model": "no/such", "prompt": "x"}, 404, "model"),
])
def test_bad_batch_completion_bodies(stack, body, status, param):
    response = raw_post(stack, "/v1/batch/completions", body, token="batch")
    assert response.status == status
    assert response.json()["error"]["param"] == param


def test_jobs_are_shared_in_their_project_and_hidden_from_others(stack):
    job = raw_post(stack, "/v1/batch/completions",
                   {"model": "sim/fast", "prompt": "mine", "max_tokens": 1},
                   token="batch").json()
    assert _get(stack, job["status_url"], token="batch2").status == 200  # same project
    assert _get(stack, job["status_url"], token="monitor").status == 200
    for scope in ("batch", "monitor"):
        assert _get(stack, job["status_url"], token=OTHER_TOKENS[scope]).status == 404
    assert _get(stack, job["status_url"], token="realtime").status == 403
    assert raw_post(stack, "/v1/batch/completions", {"model": "sim/fast", "prompt": "x"},
                    token="realtime").status == 403


def test_cancel_a_job_that_has_not_run(stack, registry):
    # The broken model never starts, so its job stays queued until cancelled.
    job = raw_post(stack, "/v1/batch/completions",
                   {"model": "sim/broken", "prompt": "x", "max_tokens": 1},
                   token="batch").json()
    time.sleep(0.5)
    cancelled = raw_post(stack, f"{job['status_url']}/cancel", {}, token="batch")
    assert cancelled.status == 200 and cancelled.json()["status"] == "cancelled"
    assert _get(stack, job["status_url"]).json()["status"] == "cancelled"


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _requests(count: int, model: str = "sim/fast", url: str = "/v1/completions",
              max_tokens: int = 4) -> list[dict]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": url,
             "body": {"model": model, "prompt": f"line {i}", "max_tokens": max_tokens}}
            for i in range(count)]


def _run_batch(stack, lines: list[dict], endpoint="/v1/completions", **kwargs):
    uploader = sdk(stack, TOKENS["upload"])
    client = sdk(stack, TOKENS["batch"])
    uploaded = uploader.files.create(file=("input.jsonl", io.BytesIO(_jsonl(lines))),
                                     purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,
                                  completion_window="24h", **kwargs)
    return client, uploaded, batch


def _wait_batch(client, batch_id: str, statuses=("completed", "failed", "cancelled", "expired"),
                timeout: float = 120):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b,
                    timeout, interval=0.3, what=f"batch {batch_id}")


def _output(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_files_and_batches_with_the_sdk(stack):
    warm(stack, "sim/fast")
    lines = _requests(120)
    lines[7]["body"]["max_tokens"] = 100_000  # the engine refuses it: an error-file line
    client, uploaded, batch = _run_batch(stack, lines, metadata={"team": "search"})
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(lines))
    assert batch.status == "validating" and batch.metadata == {"team": "search"}
    done = _wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 120
    assert done.request_counts.completed == 119 and done.request_counts.failed == 1
    output = _output(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(
        f"req-{i}" for i in range(120) if i != 7)
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert output[0]["response"]["body"]["object"] == "text_completion"
    errors = _output(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-7"]
    assert errors[0]["response"]["status_code"] == 400
    # The other SDK calls.
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert any(b.id == batch.id for b in client.batches.list(limit=100).data)
    assert sdk(stack, TOKENS["upload"]).files.delete(uploaded.id).deleted


def test_chat_batch(stack):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "sim/fast", "max_tokens": 3,
                       "messages": [{"role": "user", "content": f"hi {i}"}]}}
             for i in range(10)]
    client, _, batch = _run_batch(stack, lines, endpoint="/v1/chat/completions")
    done = _wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 10
    assert _output(client, done.output_file_id)[0]["response"]["body"]["object"] == \
        "chat.completion"


def test_a_bad_file_fails_validation_with_line_numbers(stack):
    good = _requests(3)
    raw = (_jsonl(good[:1]) + b"{not json\n" + _jsonl(good[1:2]) + _jsonl(good[1:2])
           + _jsonl([{**good[2], "url": "/v1/embeddings"}])
           + _jsonl([{**good[2], "custom_id": "other", "body": {"model": "no/such",
                                                               "prompt": "x"}}])
           + _jsonl([{**good[2], "custom_id": "typed", "body": {"model": "sim/fast",
                                                               "prompt": "x",
                                                               "max_tokens": "ten"}}])
           # Nested far past the depth limit, then a custom_id and a method of the wrong type.
           + b'{"custom_id": "deep", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
           + _jsonl([{**good[2], "custom_id": 17}])
           + _jsonl([{**good[2], "custom_id": "get", "method": ["GET"]}]))
    uploaded = sdk(stack, TOKENS["upload"]).files.create(file=("bad.jsonl", io.BytesIO(raw)),
                                                         purpose="batch")
    client = sdk(stack, TOKENS["batch"])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h")
    done = _wait_batch(client, batch.id)
    assert done.status == "failed"
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {(2, "invalid_json"), (4, "duplicate_custom_id"), (5, "invalid_url"),
                     (6, "model_not_found"), (7, "invalid_body"), (8, "invalid_json"),
                     (9, "missing_custom_id"), (10, "invalid_method")}, found
    deep = next(e for e in done.errors.data if e.line == 8)
    assert "64 levels" in deep.message


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"endpoint": "/v1/moderations", "completion_window": "24h"}, "endpoint"),
    ({"endpoint": "/v1/completions", "completion_window": "1h"}, "completion_window"),
])
def test_bad_batch_parameters_are_400(stack, kwargs, param):
    uploaded = sdk(stack, TOKENS["upload"]).files.create(
        file=("in.jsonl", io.BytesIO(_jsonl(_requests(1)))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(stack, TOKENS["batch"]).batches.create(input_file_id=uploaded.id, **kwargs)
    assert caught.value.body["param"] == param


def test_unknown_input_file_is_400(stack):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(stack, TOKENS["batch"]).batches.create(
            input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    assert caught.value.body["code"] == "file_not_found"


def test_upload_needs_the_upload_scope_and_a_purpose(stack):
    with pytest.raises(openai.PermissionDeniedError):
        sdk(stack, TOKENS["batch"]).files.create(file=("x.jsonl", io.BytesIO(b"{}\n")),
                                                 purpose="batch")
    with pytest.raises(openai.BadRequestError):
        sdk(stack, TOKENS["upload"]).files.create(file=("x.jsonl", io.BytesIO(b"{}\n")),
                                                  purpose="fine-tune")
