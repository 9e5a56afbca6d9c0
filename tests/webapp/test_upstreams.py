"""Engines the orchestrator does not run, and fallbacks, through the stack: a catalog upstream
(a sim engine started by the test, with vLLM's --api-key) is served like a managed model,
never started, health-checked; a cold model with a fallback is answered by it for keys that
opt in, the answer's `model` saying who answered."""

from __future__ import annotations

import io
import json

import openai
import pytest
import redis as redis_lib

from runtimes.registry import RuntimeRegistry
from tests.conftest import DEAD_UPSTREAM, TOKENS, UPSTREAM_MODEL, raw_post, sdk, warm
from tests.harness import wait_for
from tests.webapp.test_bad_input import assert_openai_error


@pytest.fixture(scope="module")
def registry(stack) -> RuntimeRegistry:
    return RuntimeRegistry(redis_lib.Redis.from_url(stack.env["REDIS_URL"]))


def test_an_upstream_is_served_like_a_managed_model(stack, registry):
    client = sdk(stack, TOKENS["realtime"])
    answer = client.completions.create(model=UPSTREAM_MODEL, prompt="far away", max_tokens=3)
    assert answer.model == UPSTREAM_MODEL and answer.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Never started or stopped by us: no instance of it in the registry.
    assert registry.for_model(UPSTREAM_MODEL) == []
    listed = {m.id: m for m in client.models.list().data}
    assert listed[UPSTREAM_MODEL].model_extra["engine"] == "upstream"
    assert listed[UPSTREAM_MODEL].model_extra["state"] == "ready"

    lines = [{"custom_id": f"x{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": UPSTREAM_MODEL, "prompt": f"{i}", "max_tokens": 2}}
             for i in range(3)]
    uploaded = sdk(stack, TOKENS["upload"]).files.create(file=("x.jsonl", io.BytesIO(
        b"".join(json.dumps(x).encode() + b"\n" for x in lines))), purpose="batch")
    batcher = sdk(stack, TOKENS["batch"])
    batch = batcher.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                   completion_window="24h")
    done = wait_for(lambda: (b := batcher.batches.retrieve(batch.id)).status == "completed"
                    and b, 60, interval=0.2, what="the batch of upstream lines")
    assert done.request_counts.completed == 3


def test_an_upstream_that_does_not_answer_is_an_honest_503(stack):
    def checked():
        answer = raw_post(stack, "/v1/completions", {"model": DEAD_UPSTREAM, "prompt": "x",
                                                     "max_tokens": 1})
        assert answer.status in (502, 503), answer.data
        return answer if answer.status == 503 else None

    answer = wait_for(checked, 30, interval=0.5, what="the dead upstream's health check")
    error = assert_openai_error(answer, 503)
    assert error["code"] == "upstream_unavailable" and answer.headers["Retry-After"]
    models = {m.id: m for m in sdk(stack, TOKENS["realtime"]).models.list().data}
    assert models[DEAD_UPSTREAM].model_extra["state"] == "failed"


def test_a_cold_model_is_answered_by_its_fallback_for_keys_that_opt_in(stack, registry):
    warm(stack, "sim/fast")
    assert not registry.for_model("sim/withfallback")
    # A key without the opt-in gets the honest 503 (and the start it asks for).
    with pytest.raises(openai.InternalServerError) as cold:
        sdk(stack, TOKENS["realtime"]).completions.create(model="sim/withfallback",
                                                          prompt="x", max_tokens=2)
    assert cold.value.status_code == 503
    raw = sdk(stack, TOKENS["fallback"]).completions.with_raw_response.create(
        model="sim/withfallback", prompt="x", max_tokens=2)
    answer = raw.parse()  # the model takes 2.5 s to load: still cold, the fallback answers
    assert answer.model == "sim/fast" and raw.headers["X-Answered-By"] == "sim/fast"
    assert answer.usage.completion_tokens == 2
    # Once it is warm, it answers itself.
    wait_for(lambda: registry.for_model("sim/withfallback")
             and any(r.state == "ready" for r in registry.for_model("sim/withfallback")),
             30, interval=0.2, what="the cold model's own start")
    own = wait_for(lambda: (a := sdk(stack, TOKENS["fallback"]).completions.create(
        model="sim/withfallback", prompt="x", max_tokens=2)).model == "sim/withfallback" and a,
        10, interval=0.3, what="the model's own answer")
    assert own.usage.completion_tokens == 2
