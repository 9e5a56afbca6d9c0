"""The engine contract: what the gateway relies on from an engine, checked against the `sim` and
a real vLLM alike (each test runs on both). Where they disagree, the sim is wrong.

The engines are called directly, with the official `openai` SDK and raw HTTP, on the endpoints
the gateway's control plane started them on. The tiny model's words are noise; the tests look
at shapes, counts, limits, errors, scheduling and the engine's own metrics, never at meaning.
Where a test needs a call to last its whole length it sends vLLM's `ignore_eos` (sampling may
pick the tiny model's end-of-sequence now and then; the sim never does, and accepts the field).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from urllib.parse import urlsplit

import openai
import pytest

from runtimes.catalog import ModelSpec
from runtimes.engine_priority import REALTIME, engine_priority
from tests.contract.conftest import MAX_MODEL_LEN, MAX_NUM_SEQS, StreamWatch, overtake
from tests.harness import wait_for

JUDGE_SCHEMA = {"type": "json_schema", "json_schema": {
    "name": "label", "strict": True,
    "schema": {"type": "object", "additionalProperties": False, "required": ["label"],
               "properties": {"label": {"type": "string", "enum": ["good", "bad"]}}}}}


def _error(response) -> dict:
    return json.loads(response.data)["error"]


# ---------------------------------------------------------------- readiness, models, metrics


def test_readiness_and_models(engine):
    assert engine.engine.probe(engine.endpoint, engine.model)
    assert not engine.engine.probe(engine.endpoint, "some/other-model")
    assert engine.get("/health").status == 200
    listed = json.loads(engine.get("/v1/models").data)
    assert listed["object"] == "list"
    (entry,) = listed["data"]
    assert entry["id"] == engine.model and entry["object"] == "model"
    assert entry["owned_by"] == "vllm" and entry["max_model_len"] == MAX_MODEL_LEN
    assert entry["root"]  # the repo or path loaded
    assert [m.id for m in engine.client().models.list()] == [engine.model]


def test_metrics_parse_into_the_engines_load(engine):
    engine.idle()
    load = engine.engine.load(engine.endpoint)
    assert load is not None and (load.waiting, load.running) == (0, 0)
    assert 0 <= load.cache_usage <= 1
    names = {s.name for s in engine.metric_samples()}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_requests_waiting_by_reason", "vllm:kv_cache_usage_perc",
                 "vllm:engine_sleep_state", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_sum"):
        assert name in names, name
    running = [s for s in engine.metric_samples() if s.name == "vllm:num_requests_running"]
    assert running[0].labels == {"engine": "0", "model_name": engine.model}
    reasons = {s.labels["finished_reason"] for s in engine.metric_samples()
               if s.name == "vllm:request_success_total"}
    assert {"stop", "length", "abort"} <= reasons
    before = engine.metric("vllm:generation_tokens_total")
    engine.client().completions.create(model=engine.model, prompt="count", max_tokens=6)
    assert engine.metric("vllm:generation_tokens_total") - before == 6


# ---------------------------------------------------------------- completions and chat


def test_completion_shape_and_usage(engine):
    result = engine.client().completions.create(model=engine.model, prompt="hello there",
                                                max_tokens=5)
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.model == engine.model
    (choice,) = result.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert result.usage.completion_tokens == 5 and result.usage.prompt_tokens >= 1
    assert result.usage.total_tokens == result.usage.prompt_tokens + 5


def test_model_left_out_means_the_served_one(engine):
    response = engine.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert response.status == 200 and json.loads(response.data)["model"] == engine.model


def test_chat_shape_and_max_completion_tokens(engine):
    client = engine.client()
    result = client.chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    (choice,) = result.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and result.usage.completion_tokens == 4
    preferred = client.chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3, max_tokens=9)
    assert preferred.usage.completion_tokens == 3


def test_streamed_completion_with_usage(engine):
    stream = engine.client().completions.create(
        model=engine.model, prompt="stream", max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    *tokens, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in tokens)
    assert [c.choices[0].finish_reason for c in tokens][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in tokens[:-1])


def test_streamed_chat_with_usage_and_done(engine):
    response = engine.post("/v1/chat/completions", {
        "model": engine.model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.data.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_no_usage_chunk_unless_asked(engine):
    chunks = list(engine.client().chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_n_choices(engine):
    client = engine.client()
    result = client.completions.create(model=engine.model, prompt="many", max_tokens=3, n=3,
                                       temperature=1.0)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.completion_tokens == 9
    chat = client.chat.completions.create(model=engine.model, max_tokens=2, n=2,
                                          messages=[{"role": "user", "content": "two"}])
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = list(client.completions.create(model=engine.model, prompt="many", max_tokens=2,
                                              n=2, temperature=1.0, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}
    # vLLM refuses n > 1 under greedy sampling (they would all be the same).
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=engine.model, prompt="x", max_tokens=2, n=2,
                                  temperature=0)
    assert refused.value.body["message"] == "n must be 1 when using greedy sampling, got 2."


def test_logprobs(engine):
    client = engine.client()
    result = client.completions.create(model=engine.model, prompt="lp", max_tokens=4,
                                       logprobs=2)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    chat = client.chat.completions.create(model=engine.model, max_tokens=3, logprobs=True,
                                          top_logprobs=2,
                                          messages=[{"role": "user", "content": "lp"}])
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert isinstance(token.bytes, list)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=engine.model, prompt="lp", max_tokens=2, logprobs=21)
    assert refused.value.body["param"] == "logprobs"
    assert "greater than max allowed: 20" in refused.value.body["message"]
    response = engine.post("/v1/chat/completions", {
        "model": engine.model, "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2, "top_logprobs": 2})
    assert response.status == 400 and _error(response)["param"] == "top_logprobs"


def _ascii_stop(text: str) -> str | None:
    """Two letters or digits from the middle of `text`, found nowhere before."""
    for match in re.finditer(r"[A-Za-z0-9]{2}", text):
        if match.start() >= 2 and text.find(match.group()) == match.start():
            return match.group()
    return None


def test_stop_string(engine):
    client = engine.client()
    prompt = "stop somewhere"
    whole = client.completions.create(model=engine.model, prompt=prompt, max_tokens=24,
                                      temperature=0).choices[0].text
    stop = _ascii_stop(whole)
    assert stop, whole
    cut = client.completions.create(model=engine.model, prompt=prompt, max_tokens=24,
                                    temperature=0, stop=[stop, "never-generated-xyz"])
    choice = cut.choices[0]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop)
    assert choice.text == whole[: whole.find(stop)]


def test_json_schema_response_format(engine):
    client = engine.client()
    for question in ("Is this good?", "And this one?", "Third"):
        answer = client.chat.completions.create(
            model=engine.model, messages=[{"role": "user", "content": question}],
            max_tokens=64, temperature=0, response_format=JUDGE_SCHEMA)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        assert json.loads(choice.message.content)["label"] in ("good", "bad")
    response = engine.post("/v1/chat/completions", {
        "model": engine.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}})
    assert response.status == 400
    error = _error(response)
    assert error["type"] == "BadRequestError" and error["param"] is None
    assert error["message"].startswith("Grammar error: ")


# ---------------------------------------------------------------- errors


def test_unknown_model_is_404(engine):
    with pytest.raises(openai.NotFoundError) as caught:
        engine.client().completions.create(model="no/such-model", prompt="x", max_tokens=2)
    assert caught.value.body == {
        "message": f"The model `no/such-model` does not exist. Valid aliases: {engine.model}.",
        "type": "NotFoundError", "param": "model", "code": 404}


def test_too_many_tokens(engine):
    client = engine.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=engine.model, prompt="x", max_tokens=MAX_MODEL_LEN + 1)
    assert caught.value.body["param"] == "max_tokens"
    assert caught.value.body["type"] == "BadRequestError"
    assert caught.value.body["message"].startswith(
        f"max_tokens={MAX_MODEL_LEN + 1} cannot be greater than max_model_len={MAX_MODEL_LEN}.")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=engine.model, prompt="hello " * (MAX_MODEL_LEN + 10),
                                  max_tokens=4)
    assert caught.value.body["param"] == "input_tokens"
    assert caught.value.body["message"].startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your prompt "
        f"contains at least {MAX_MODEL_LEN + 1} input tokens")
    # A max_tokens that fits the context alone but not with the prompt is cut, not refused.
    cut = client.completions.create(model=engine.model, prompt="hello " * 1500, max_tokens=1000)
    assert cut.usage.total_tokens == MAX_MODEL_LEN and cut.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("body", "kind", "param"), [
    ({"prompt": "x", "max_tokens": 0}, "BadRequestError", "max_tokens"),
    ({"prompt": "x", "n": 0}, "BadRequestError", None),
    ({}, "BadRequestError", "prompt"),
    ({"prompt": ""}, "BadRequestError", "prompt"),
    ({"prompt": []}, "BadRequestError", None),
    ({"prompt": "x", "stop": 5}, "Bad Request", "body.stop"),
    ({"prompt": "x", "stream": "maybe"}, "Bad Request", "body.stream"),
    ({"prompt": "x", "priority": "high"}, "Bad Request", "body.priority"),
    ({"prompt": "x", "priority": 1.5}, "Bad Request", "body.priority"),
])
def test_refused_completion_bodies(engine, body, kind, param):
    response = engine.post("/v1/completions", {"model": engine.model, **body})
    assert response.status == 400
    error = _error(response)
    assert (error["type"], error["param"], error["code"]) == (kind, param, 400)
    if kind == "Bad Request":  # pydantic's validation errors, as vLLM words them
        assert re.match(r"\d+ validation errors?:\n  \{'type': ", error["message"])


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_tokens": "3"},  # pydantic's lax mode: numeric strings are numbers
    {"prompt": "x", "max_tokens": 3, "stream": "yes"},
    {"prompt": "x", "max_tokens": 3, "n": 2.0, "temperature": 1},
    {"prompt": "x", "max_tokens": 3, "priority": -3},
    {"prompt": [1, 2, 3], "max_tokens": 3},
    {"prompt": ["a", "b"], "max_tokens": 3},
])
def test_accepted_completion_bodies(engine, body):
    response = engine.post("/v1/completions", {"model": engine.model, **body})
    assert response.status == 200, response.data


@pytest.mark.parametrize(("raw", "param"), [
    (b"{not json", "body.1"),
    (b'["a", "list"]', "body"),
])
def test_malformed_json_bodies(engine, raw, param):
    response = engine.post("/v1/completions", raw)
    assert response.status == 400
    error = _error(response)
    assert error["type"] == "Bad Request" and error["param"].startswith(param.split(".")[0])


def test_refused_chat_bodies(engine):
    empty = engine.post("/v1/chat/completions", {"model": engine.model, "messages": []})
    assert empty.status == 400
    assert _error(empty)["message"] == ("Cannot apply chat template to an empty conversation. "
                                        "Provide at least one message.")
    not_a_list = engine.post("/v1/chat/completions", {"model": engine.model, "messages": "hi"})
    assert not_a_list.status == 400 and _error(not_a_list)["param"] == "body.messages"
    no_role = engine.post("/v1/chat/completions",
                          {"model": engine.model, "messages": [{"content": "hi"}]})
    assert no_role.status == 400 and _error(no_role)["type"] == "Bad Request"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    auto = engine.post("/v1/chat/completions", {
        "model": engine.model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "tools": tools})
    assert auto.status == 400
    assert _error(auto)["message"] == ('"auto" tool choice requires --enable-auto-tool-choice '
                                       "and --tool-call-parser to be set")
    none = engine.post("/v1/chat/completions", {
        "model": engine.model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "tools": tools, "tool_choice": "none"})
    assert none.status == 200


# ---------------------------------------------------------------- scheduling


def test_max_num_seqs_queues_the_rest(engine):
    """With --max-num-seqs 8 and 12 calls in flight: 8 run, the rest wait, as the metrics say.

    The calls are long (1,800 tokens: 6 s or more with 8 at once): a busy vLLM's API server
    shares the 2 cores here and may take seconds to answer /metrics, and what it answers is
    the state when it got round to it. It may also take seconds to hand the last call or two to
    its scheduler, so the test asks for 8 running and at least 3 of the 4 others waiting, and
    never more than 8 running."""
    engine.idle()
    calls = [StreamWatch(engine, {"model": engine.model, "prompt": f"queue {i}",
                                  "max_tokens": 1800, "ignore_eos": True}, stream=False).start()
             for i in range(12)]
    time.sleep(1)
    seen: list = []

    def queued(running, waiting) -> bool:
        seen.append((running, waiting))
        return running == MAX_NUM_SEQS and waiting >= 3

    engine.wait_queue(queued, "8 running, the rest waiting")
    for call in calls:
        call.join(120)
    assert max(running for running, _ in seen) == MAX_NUM_SEQS, seen
    engine.idle()


def test_priority_lets_a_late_call_overtake_the_waiting_ones(engine):
    """Under --scheduling-policy priority a waiting call with a more urgent priority (lower, on
    vLLM and the sim) is the next to start, ahead of calls that came before it; running calls
    are not cut off. The values are the ones engine_priority gives realtime and batch work."""
    spec = ModelSpec(engine.model, engine.kind, args=("--scheduling-policy", "priority"))
    late, waiting, running = overtake(engine, engine_priority(spec, REALTIME))
    assert all(w.done_at > late.done_at for w in waiting), (
        late.done_at, [w.done_at for w in waiting], [w.done_at for w in running])


def test_client_disconnect_aborts_the_request(engine):
    engine.idle()
    # Plain http.client: the request is cut at a known point, the stream barely begun.
    address = urlsplit(engine.endpoint)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({
        "model": engine.model, "prompt": "hang up", "max_tokens": 1800, "stream": True,
        "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    stream = connection.getresponse()
    assert stream.status == 200
    stream.read1(64)  # the stream has begun: the request is running
    assert engine.metric("vllm:num_requests_running") == 1
    connection.close()  # hang up, about 5 s before the end
    hung_up = time.monotonic()
    wait_for(lambda: engine.metric("vllm:num_requests_running") == 0, 3, interval=0.05,
             what="the request aborted")
    assert time.monotonic() - hung_up < 3


# ---------------------------------------------------------------- sleep mode


def test_sleep_holds_calls_until_wake_up(engine):
    engine.idle()
    refused = engine.post("/sleep?level=3", b"")
    assert refused.status == 400 and _error(refused)["param"] == "query.level"
    asleep = engine.post("/sleep?level=1", b"")
    assert asleep.status == 200 and json.loads(asleep.data) == {"status": "sleeping",
                                                                "level": 1}
    try:
        assert json.loads(engine.get("/is_sleeping").data) == {"is_sleeping": True}
        state = {s.labels["sleep_state"]: s.value for s in engine.metric_samples()
                 if s.name == "vllm:engine_sleep_state"}
        assert state == {"awake": 0, "weights_offloaded": 1, "discard_all": 0}
        assert engine.get("/health").status == 200  # readiness holds while asleep
        answers: list = []
        caller = threading.Thread(target=lambda: answers.append(
            engine.client().completions.create(model=engine.model, prompt="anyone home",
                                               max_tokens=2)))
        caller.start()
        time.sleep(1.5)
        assert answers == []  # held: neither answered nor refused
        assert engine.metric("vllm:num_requests_waiting") == 0  # and not queued either
    finally:
        awake = engine.post("/wake_up", b"")
    assert awake.status == 200 and json.loads(awake.data)["status"] == "awake"
    caller.join(30)
    assert len(answers) == 1 and answers[0].usage.completion_tokens == 2
    assert json.loads(engine.get("/is_sleeping").data) == {"is_sleeping": False}
    assert engine.engine.probe(engine.endpoint, engine.model)
