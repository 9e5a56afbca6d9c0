"""Usage per key through the stack: realtime calls (plain and streamed; a stream that did not
ask for usage is relayed without it), a batch, and `GET /v1/usage` in JSON and CSV, which equals
the sum of what the engine reported, per key, seen by its project only."""

from __future__ import annotations

import csv
import io
import json
import time

import urllib3

from tests.conftest import OTHER_TOKENS, TOKENS, raw_post, sdk, warm
from tests.harness import wait_for
from tests.webapp.test_bad_input import assert_openai_error


def _usage(stack, token: str, **query) -> urllib3.BaseHTTPResponse:
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return urllib3.request("GET", f"{stack.base_url}/v1/usage?{params}", retries=False,
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _rows(stack, token: str, start: int, **query) -> list[dict]:
    answer = _usage(stack, token, start=start, bucket="day", **query)
    assert answer.status == 200, answer.data
    return answer.json()["data"]


def _sse(stack, body: dict) -> list[dict]:
    answer = urllib3.request(
        "POST", f"{stack.base_url}/v1/chat/completions", body=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKENS['usage']}",
                 "Content-Type": "application/json"}, preload_content=True, timeout=30)
    assert answer.status == 200, answer.data
    events = [e[len(b"data: "):] for e in answer.data.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_realtime_and_batch_usage_add_up_per_key(stack):
    warm(stack, "sim/fast")
    warm(stack, "sim/embed", embedding=True)
    start = int(time.time()) - 1
    client = sdk(stack, TOKENS["usage"])
    prompt = completion = 0
    for max_tokens in (3, 5):
        answer = client.completions.create(model="sim/fast", prompt="count me",
                                           max_tokens=max_tokens)
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
    chat = {"model": "sim/fast", "messages": [{"role": "user", "content": "stream me"}],
            "max_tokens": 4, "stream": True}
    # Not asked for: counted, and the stream is what it would have been (no usage event).
    plain = _sse(stack, chat)
    assert all("usage" not in e and e["choices"] for e in plain)
    whole = client.chat.completions.create(model="sim/fast", max_tokens=4,
                                           messages=chat["messages"])
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in plain) == \
        whole.choices[0].message.content
    asked = _sse(stack, {**chat, "stream_options": {"include_usage": True}})
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 4
    prompt += 3 * whole.usage.prompt_tokens
    completion += 3 * 4
    embedded = sdk(stack, TOKENS["usage"]).embeddings.create(model="sim/embed", input="x y z")
    prompt += embedded.usage.prompt_tokens

    def realtime_rows():
        rows = [r for r in _rows(stack, TOKENS["monitor"], start, group_by="key")
                if r["key"] == "test-usage"]
        return rows if rows and rows[0]["requests"] == 6 else None

    [row] = wait_for(realtime_rows, 10, interval=0.3, what="the usage report")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)

    lines = [{"custom_id": f"u{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "sim/fast", "prompt": f"line {i}", "max_tokens": i + 1}}
             for i in range(4)]
    batcher = sdk(stack, TOKENS["usage_batch"])
    file = batcher.files.create(file=("u.jsonl", io.BytesIO(
        b"".join(json.dumps(x).encode() + b"\n" for x in lines))), purpose="batch")
    batch = batcher.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                   completion_window="24h")
    batch = wait_for(lambda: (b := batcher.batches.retrieve(batch.id)).status == "completed"
                     and b, 60, interval=0.2, what="the batch")
    outputs = [json.loads(x)["response"]["body"]["usage"]
               for x in batcher.files.content(batch.output_file_id).text.splitlines()]
    [batch_row] = [r for r in _rows(stack, TOKENS["monitor"], start, group_by="key")
                   if r["key"] == "test-usage-batch"]
    assert batch_row["requests"] == 4
    assert batch_row["prompt_tokens"] == sum(u["prompt_tokens"] for u in outputs)
    assert batch_row["completion_tokens"] == sum(u["completion_tokens"] for u in outputs) == 10
    by_kind = {r["kind"]: r for r in _rows(stack, TOKENS["monitor"], start, group_by="kind")}
    assert by_kind["batch"]["completion_tokens"] >= 10

    # A key sees its own usage only; another project's monitor sees none of it.
    own = _rows(stack, TOKENS["usage"], start, group_by="key")
    assert [r["key"] for r in own] == ["test-usage"]
    assert not [r for r in _rows(stack, OTHER_TOKENS["monitor"], start, group_by="key")
                if r["key"].startswith("test-")]
    # The same as CSV, by the minute.
    text = _usage(stack, TOKENS["usage"], start=start, group_by="model", bucket="minute",
                  format="csv").data.decode()
    table = list(csv.DictReader(io.StringIO(text)))
    assert sum(int(r["total_tokens"]) for r in table) == prompt + completion
    assert {r["model"] for r in table} == {"sim/fast", "sim/embed"}
    # The token counters of /metrics carry the key's name, never its token.
    metrics = urllib3.request("GET", f"{stack.base_url}/metrics",
                              headers={"Authorization": f"Bearer {TOKENS['monitor']}"}).data
    assert b'gateway_tokens_total{key="test-usage",kind="realtime"' in metrics
    assert TOKENS["usage"].encode() not in metrics


def test_bad_usage_queries_are_400(stack):
    now = int(time.time())
    for query, param in (({"bucket": "week"}, "bucket"), ({"group_by": "color"}, "group_by"),
                         ({"start": now, "end": now - 5}, "start"),
                         ({"start": "yesterday"}, "start"),
                         ({"start": now - 30 * 86400, "bucket": "minute"}, "start"),
                         ({"format": "xml"}, "format")):
        error = assert_openai_error(_usage(stack, TOKENS["usage"], **query), 400)
        assert error["param"] == param, (query, error)
    assert raw_post(stack, "/v1/usage", {}).status == 405
