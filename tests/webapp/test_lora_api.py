"""LoRA adapters through the gateway, on the sim: `sim/lora` (max_loras 2) has three adapters
in the test catalog. A call for an adapter starts its base, loads the adapter on first use,
keeps at most two loaded (the least recently used unloaded), and loads again what the engine
lost; `/v1/models` lists adapters with their base."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
import redis as redis_lib
import urllib3

from runtimes.lora import AdapterLoader
from runtimes.registry import RuntimeRegistry
from tests.conftest import ADAPTERS, LORA_BASE, TOKENS, raw_post, ready_records, sdk
from tests.harness import wait_for
from tests.webapp.test_bad_input import assert_openai_error


def _engine_models(record) -> set[str]:
    answer = urllib3.request("GET", f"{record.endpoint}/v1/models", timeout=5)
    return {m["id"] for m in answer.json()["data"]}


def _complete(stack, model: str) -> dict:
    def done():
        answer = raw_post(stack, "/v1/completions", {"model": model, "prompt": "hi",
                                                     "max_tokens": 3})
        assert answer.status in (200, 503), answer.data
        return answer.json() if answer.status == 200 else None
    return wait_for(done, 30, interval=0.2, what=f"a completion of {model}")


@pytest.fixture(scope="module")
def registry(stack) -> RuntimeRegistry:
    return RuntimeRegistry(redis_lib.Redis.from_url(stack.env["REDIS_URL"]))


def test_models_lists_adapters_with_their_base(stack):
    listed = {m.id: m for m in sdk(stack, TOKENS["realtime"]).models.list().data}
    for adapter in ADAPTERS:
        assert listed[adapter].model_extra["parent"] == LORA_BASE
    one = sdk(stack, TOKENS["realtime"]).models.retrieve(ADAPTERS[0])
    assert one.model_extra["parent"] == LORA_BASE
    # The allowlist key (sim/fast only) sees none of them.
    hidden = {m.id for m in sdk(stack, TOKENS["allowlist"]).models.list().data}
    assert hidden.isdisjoint(ADAPTERS)


def test_adapters_load_on_demand_at_most_max_loras_per_engine(stack, registry):
    a, b, c = ADAPTERS
    if not ready_records(registry, LORA_BASE):
        # An adapter's call is demand for its base: the first one starts it.
        cold = raw_post(stack, "/v1/completions", {"model": a, "prompt": "hi", "max_tokens": 2})
        assert cold.status == 503 and cold.headers["Retry-After"], cold.data
    answer = _complete(stack, a)
    assert answer["model"] == a and answer["choices"][0]["text"]
    [record] = ready_records(registry, LORA_BASE)
    assert _engine_models(record) >= {LORA_BASE, a}
    _complete(stack, b)
    time.sleep(1.1)  # a later use of a than of b, past the loader's touch throttle
    _complete(stack, a)
    _complete(stack, c)  # the engine holds two: b, the least recently used, goes
    assert _engine_models(record) == {LORA_BASE, a, c}
    assert AdapterLoader(registry).loaded(record.id) == [a, c]
    # Streams work with an adapter too.
    client = sdk(stack, TOKENS["realtime"])
    chunks = list(client.completions.create(model=c, prompt="x", max_tokens=3, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)


def test_an_adapter_the_engine_lost_is_loaded_again(stack, registry):
    a = ADAPTERS[0]
    _complete(stack, a)
    [record] = ready_records(registry, LORA_BASE)
    unload = urllib3.request("POST", f"{record.endpoint}/v1/unload_lora_adapter",
                             body=json.dumps({"lora_name": a}).encode(),
                             headers={"Content-Type": "application/json"})
    assert unload.status == 200 and a not in _engine_models(record)
    again = raw_post(stack, "/v1/chat/completions", {
        "model": a, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert again.status == 200 and again.json()["model"] == a
    assert a in _engine_models(record)


def test_unknown_adapters_and_disallowed_keys(stack):
    error = assert_openai_error(raw_post(stack, "/v1/completions", {
        "model": f"{LORA_BASE}-zzz", "prompt": "x", "max_tokens": 1}), 404)
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        sdk(stack, TOKENS["allowlist"]).completions.create(model=ADAPTERS[0], prompt="x",
                                                           max_tokens=1)
    # An adapter is a generate model's: the embeddings route refuses it.
    error = assert_openai_error(raw_post(stack, "/v1/embeddings",
                                         {"model": ADAPTERS[0], "input": "x"}), 400)
    assert error["code"] == "model_kind_mismatch"


def test_a_batch_of_adapter_lines_runs_on_their_base(stack, registry):
    a, b, _ = ADAPTERS
    _complete(stack, a)
    [record] = ready_records(registry, LORA_BASE)
    # Lost by the engine behind the gateway's back: its lines are retried once it is loaded.
    unload = urllib3.request("POST", f"{record.endpoint}/v1/unload_lora_adapter",
                             body=json.dumps({"lora_name": a}).encode(),
                             headers={"Content-Type": "application/json"})
    assert unload.status == 200
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": (a, b, LORA_BASE)[i % 3], "prompt": f"p{i}", "max_tokens": 2}}
             for i in range(9)]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file = sdk(stack, TOKENS["upload"]).files.create(file=("lora.jsonl", io.BytesIO(data)),
                                                     purpose="batch")
    client = sdk(stack, TOKENS["batch"])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                  completion_window="24h")
    batch = wait_for(lambda: (got := client.batches.retrieve(batch.id)).status in (
        "completed", "failed") and got, 60, interval=0.2, what="the batch")
    assert batch.status == "completed" and batch.request_counts.completed == 9, batch
    rows = {json.loads(row)["custom_id"]: json.loads(row)
            for row in client.files.content(batch.output_file_id).text.splitlines()}
    for line in lines:
        answer = rows[line["custom_id"]]["response"]
        assert answer["status_code"] == 200 and answer["body"]["model"] == line["body"]["model"]
