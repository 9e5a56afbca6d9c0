"""The gateway in front of each engine, sim and real vLLM alike: realtime calls as the README's
demos make them, a 200-line `/v1/batches` job, and an eval run graded by a `label_model` judge
(structured output, which vLLM enforces with guided decoding)."""

from __future__ import annotations

import io
import json

from tests.conftest import TOKENS, raw_post
from tests.contract.conftest import overtake
from tests.harness import wait_for


def test_readme_demo_calls(engine):
    """The README's curl demos, with the engine's model id."""
    response = raw_post(engine.stack, "/v1/completions",
                        {"model": engine.model, "prompt": "hello", "max_tokens": 16})
    assert response.status == 200, response.data
    assert response.json()["usage"]["completion_tokens"] == 16
    job = raw_post(engine.stack, "/v1/batch/completions",
                   {"model": engine.model, "prompt": "Write a haiku about snow.",
                    "max_tokens": 32, "priority": 1}, token="batch")
    assert job.status == 202, job.data
    status_url = job.json()["status_url"]

    def finished():
        import urllib3

        status = urllib3.request("GET", f"{engine.stack.base_url}{status_url}", timeout=10,
                                 headers={"Authorization": f"Bearer {TOKENS['batch']}"}).json()
        return status if status["status"] in ("succeeded", "failed") else None

    status = wait_for(finished, 60, interval=0.3, what="the batch completion")
    assert status["status"] == "succeeded", status
    assert status["result"]["usage"]["completion_tokens"] == 32


def test_streamed_chat_through_the_gateway(engine):
    chunks = list(engine.gateway().chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 5


def test_a_200_line_batch(engine):
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": engine.model, "max_tokens": 4,
                       "messages": [{"role": "user", "content": f"question {i}"}]}}
             for i in range(200)]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = engine.gateway("upload").files.create(file=("in.jsonl", io.BytesIO(data)),
                                                     purpose="batch")
    client = engine.gateway("batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status
                    in ("completed", "failed", "expired", "cancelled") and b, 240,
                    interval=0.5, what="the batch")
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (200, 200, 0)
    output = [json.loads(line) for line in
              client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
    for row in output:
        assert row["response"]["status_code"] == 200 and row["error"] is None
        body = row["response"]["body"]
        assert body["model"] == engine.model and body["usage"]["completion_tokens"] == 4
        assert body["object"] == "chat.completion"


def test_an_eval_run_with_a_label_model_judge(engine):
    rows = [{"item": {"question": f"question {i}"}, "sample": {"output_text": f"reply {i}"}}
            for i in range(12)]
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    file_id = engine.gateway("upload").files.create(
        file=("items.jsonl", io.BytesIO(data)), purpose="evals").id
    client = engine.gateway("eval")
    judge = {"type": "label_model", "name": "judge", "model": engine.model,
             "input": [{"role": "user",
                        "content": "Is '{{sample.output_text}}' a good answer to "
                                   "'{{item.question}}'? Label it."}],
             "labels": ["good", "bad"], "passing_labels": ["good"]}
    created = client.evals.create(
        name=f"judged by {engine.kind}",
        data_source_config={"type": "custom", "include_sample_schema": True, "item_schema": {
            "type": "object", "properties": {"question": {"type": "string"}},
            "required": ["question"]}},
        testing_criteria=[judge])
    run = client.evals.runs.create(created.id, data_source={
        "type": "jsonl", "source": {"type": "file_id", "id": file_id}})
    done = wait_for(lambda: (r := client.evals.runs.retrieve(run.id, eval_id=created.id)).status
                    in ("completed", "failed", "canceled") and r, 240, interval=0.5,
                    what="the eval run")
    assert done.status == "completed", done
    counts = done.result_counts
    assert (counts.total, counts.errored) == (12, 0)
    assert counts.passed + counts.failed == 12
    items = list(client.evals.runs.output_items.list(run.id, eval_id=created.id))
    assert len(items) == 12
    for item in items:
        (result,) = item.results
        # Guided decoding: the judge's answer is the schema's JSON, its label one of the two.
        assert result.sample["label"] in ("good", "bad"), result
        assert item.status == ("pass" if result.sample["label"] == "good" else "fail")


def test_the_gateway_sends_realtime_calls_most_urgent_whatever_they_ask(engine):
    """A realtime call through the gateway that asks for priority 50 (behind every batch line,
    1 to 10, if it were sent as asked) is sent at the gateway's realtime priority, 0, and takes
    the first free slot ahead of the batch calls queued before it."""
    late, waiting, running = overtake(engine, 50, through_gateway=True)
    assert all(w.done_at > late.done_at for w in waiting), (
        late.done_at, [w.done_at for w in waiting], [w.done_at for w in running])
