"""The engine contract of the Responses API and the Anthropic Messages API: what vLLM 0.32.0
answers on /v1/responses and /v1/messages, checked against the `sim` and the real CPU vLLM alike.

Both engines run with VLLM_ENABLE_RESPONSES_API_STORE=1 (the contract catalog), so responses
are kept and can be retrieved. The clients are the official `openai` SDK (`client.responses`)
and the official `anthropic` SDK, pointed at the engine itself; raw HTTP where the test looks at
the wire (event names, exact error bodies). As in the rest of the suite the words are noise:
the tests compare shapes, counts, event order, statuses and errors.
"""

from __future__ import annotations

import json
import re

import anthropic
import openai
import pytest

from tests.contract.conftest import MAX_MODEL_LEN, EngineUnderTest

# Every field of vLLM's response object (ResponsesResponse), measured on 0.32.0.
RESPONSE_FIELDS = {
    "id", "created_at", "incomplete_details", "instructions", "metadata", "model", "object",
    "output", "parallel_tool_calls", "temperature", "tool_choice", "tools", "top_p",
    "background", "max_output_tokens", "max_tool_calls", "previous_response_id", "prompt",
    "reasoning", "service_tier", "status", "text", "top_logprobs", "truncation", "usage", "user",
    "presence_penalty", "frequency_penalty", "kv_transfer_params", "ec_transfer_params",
    "input_messages", "output_messages",
}
STREAM_HEAD = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
STREAM_TAIL = ["response.output_text.done", "response.content_part.done",
               "response.output_item.done", "response.completed"]
# `ignore_eos` (a vLLM field; the sim never ends early) keeps the tiny model talking to the limit.
WHOLE = {"ignore_eos": True}


def _json(response) -> dict:
    return json.loads(response.data)


def _sse(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n", 1)
            assert name.startswith("event: ") and data.startswith("data: "), block
            events.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return events


def _anthropic(engine: EngineUnderTest) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=engine.endpoint, api_key="x", max_retries=0, timeout=60)


def _not_found(response_id: str) -> dict:
    return {"error": {"message": f"Response with id '{response_id}' not found.",
                      "type": "invalid_request_error", "param": "response_id", "code": 404}}


def _stop_in(text: str) -> str | None:
    """Two letters or digits from the middle of `text`, found nowhere before."""
    for match in re.finditer(r"[A-Za-z0-9]{2}", text):
        if match.start() >= 2 and text.find(match.group()) == match.start():
            return match.group()
    return None


# ---------------------------------------------------------------- Responses API


def test_response_object(engine):
    client = engine.client()
    result = client.responses.create(model=engine.model, input="hello there",
                                     max_output_tokens=5, extra_body=WHOLE)
    assert re.fullmatch(r"resp_[0-9a-f]{16}", result.id), result.id
    assert result.object == "response" and result.model == engine.model
    # Cut by max_output_tokens: vLLM says "incomplete", and why.
    assert result.status == "incomplete"
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.max_output_tokens == 5 and result.background is False
    (item,) = result.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert re.fullmatch(r"msg_[0-9a-f]{16}", item.id), item.id
    (part,) = item.content
    assert part.type == "output_text" and part.text == result.output_text
    usage = result.usage
    assert usage.output_tokens == 5 and usage.input_tokens >= 1
    assert usage.total_tokens == usage.input_tokens + 5
    raw = engine.post("/v1/responses", {"model": engine.model, "input": "hi",
                                        "max_output_tokens": 2, **WHOLE})
    assert raw.status == 200 and set(_json(raw)) == RESPONSE_FIELDS
    body = _json(raw)
    assert (body["tool_choice"], body["tools"], body["truncation"]) == ("none", [], "disabled")
    assert set(body["usage"]) == {"input_tokens", "input_tokens_details", "output_tokens",
                                  "output_tokens_details", "total_tokens"}


def test_response_input_forms_and_instructions(engine):
    client = engine.client()

    def input_tokens(**kw) -> int:
        return client.responses.create(model=engine.model, max_output_tokens=2,
                                       extra_body=WHOLE, **kw).usage.input_tokens

    as_text = input_tokens(input="hi")
    assert input_tokens(input=[{"role": "user", "content": "hi"}]) == as_text
    assert input_tokens(input=[{"type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": "hi"}]}]) == as_text
    longer = input_tokens(input=[{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "again"}])
    assert longer > as_text
    instructed = client.responses.create(model=engine.model, input="hi",
                                         instructions="Be brief.", max_output_tokens=2)
    assert instructed.instructions == "Be brief." and instructed.usage.input_tokens > as_text


def test_response_completed_at_a_stop_string(engine):
    client = engine.client()
    whole = client.responses.create(model=engine.model, input="stop somewhere",
                                    max_output_tokens=24, temperature=0, extra_body=WHOLE)
    stop = _stop_in(whole.output_text)
    assert stop, whole.output_text
    cut = client.responses.create(model=engine.model, input="stop somewhere",
                                  max_output_tokens=24, temperature=0,
                                  extra_body={**WHOLE, "stop": [stop]})
    assert cut.status == "completed" and cut.incomplete_details is None
    assert cut.output_text == whole.output_text[: whole.output_text.find(stop)]
    assert cut.usage.output_tokens < 24


def test_response_stream_events(engine):
    response = engine.post("/v1/responses", {"model": engine.model, "input": "hello",
                                             "max_output_tokens": 4, "stream": True, **WHOLE})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _sse(response.data)
    names = [name for name, _ in events]
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert names == STREAM_HEAD + ["response.output_text.delta"] * len(deltas) + STREAM_TAIL
    assert 1 <= len(deltas) <= 4
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    created, in_progress = events[0][1]["response"], events[1][1]["response"]
    assert created["status"] == in_progress["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    assert set(created) == RESPONSE_FIELDS
    item = events[2][1]["item"]
    assert (item["status"], item["content"], item["type"]) == ("in_progress", [], "message")
    assert all(d["item_id"] == item["id"] and d["output_index"] == 0 for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert events[-4][1]["text"] == text and events[-3][1]["part"]["text"] == text
    final = events[-1][1]["response"]
    assert final["id"] == created["id"] and final["status"] == "incomplete"
    assert final["output"] == [events[-2][1]["item"]]
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == 4


def test_response_stream_with_the_sdk(engine):
    stream = engine.client().responses.create(model=engine.model, input="hello", stream=True,
                                              max_output_tokens=3, extra_body=WHOLE)
    events = list(stream)
    assert [e.type for e in events[:4]] == STREAM_HEAD
    assert [e.type for e in events[-4:]] == STREAM_TAIL
    completed = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert completed.output_text == text and completed.usage.output_tokens == 3


def test_stored_responses_are_retrieved(engine):
    client = engine.client()
    created = client.responses.create(model=engine.model, input="keep me",
                                      max_output_tokens=3, store=True)
    again = client.responses.retrieve(created.id)
    assert again.model_dump() == created.model_dump()
    events = _sse(engine.post("/v1/responses", {
        "model": engine.model, "input": "keep me too", "max_output_tokens": 3,
        "stream": True, "store": True, **WHOLE}).data)
    streamed = events[-1][1]["response"]
    stored = engine.get(f"/v1/responses/{streamed['id']}")
    assert stored.status == 200 and _json(stored) == streamed
    follow_up = client.responses.create(model=engine.model, input="and then",
                                        previous_response_id=created.id, max_output_tokens=2)
    assert follow_up.previous_response_id == created.id
    alone = client.responses.create(model=engine.model, input="and then", max_output_tokens=2)
    assert follow_up.usage.input_tokens > alone.usage.input_tokens


def test_unstored_and_unknown_responses_are_not_found(engine):
    client = engine.client()
    unstored = client.responses.create(model=engine.model, input="forget me",
                                       max_output_tokens=2, store=False)
    for response_id in (unstored.id, "resp_0123456789abcdef", "nothing-like-an-id"):
        got = engine.get(f"/v1/responses/{response_id}")
        assert (got.status, _json(got)) == (404, _not_found(response_id))
        cancelled = engine.post(f"/v1/responses/{response_id}/cancel", b"")
        assert (cancelled.status, _json(cancelled)) == (404, _not_found(response_id))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    refused = engine.post("/v1/responses", {"model": engine.model, "input": "x",
                                            "previous_response_id": "resp_nope"})
    assert (refused.status, _json(refused)) == (404, _not_found("resp_nope"))


def test_cancel(engine):
    client = engine.client()
    done = client.responses.create(model=engine.model, input="done", max_output_tokens=2)
    refused = engine.post(f"/v1/responses/{done.id}/cancel", b"")
    assert refused.status == 400 and _json(refused) == {"error": {
        "message": "Cannot cancel a synchronous response.", "type": "invalid_request_error",
        "param": "response_id", "code": 400}}
    assert client.responses.retrieve(done.id).status == done.status  # untouched
    engine.idle()
    queued = client.responses.create(model=engine.model, input="long", background=True,
                                     max_output_tokens=1500, extra_body=WHOLE)
    assert (queued.status, queued.background, queued.output) == ("queued", True, [])
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.id == queued.id and cancelled.status == "cancelled"
    assert client.responses.retrieve(queued.id).status == "cancelled"
    twice = engine.post(f"/v1/responses/{queued.id}/cancel", b"")
    assert twice.status == 400 and _json(twice)["error"]["param"] == "response_id"
    engine.idle(timeout=10)  # the generation was aborted, not left to run its 1,500 tokens


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"input": "x", "max_output_tokens": MAX_MODEL_LEN + 1}, 400, {
        "message": f"max_output_tokens={MAX_MODEL_LEN + 1} cannot be greater than "
                   f"max_model_len={MAX_MODEL_LEN}. Please request fewer output tokens. "
                   f"(parameter=max_output_tokens, value={MAX_MODEL_LEN + 1})",
        "type": "BadRequestError", "param": "max_output_tokens", "code": 400}),
    ({"input": "x", "max_output_tokens": 0}, 400, {
        "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}),
    ({"input": "x", "model": "no/such-model"}, 404, {
        "message": "The model `no/such-model` does not exist. Valid aliases: {model}.",
        "type": "NotFoundError", "param": "model", "code": 404}),
    ({"input": []}, 400, {
        "message": "Cannot apply chat template to an empty conversation. Provide at least one "
                   "message.", "type": "BadRequestError", "param": None, "code": 400}),
    ({"input": "x", "background": True, "store": False}, 400, {
        "message": "background can only be used when `store` is true (parameter=background)",
        "type": "BadRequestError", "param": "background", "code": 400}),
    ({"input": "hello " * (MAX_MODEL_LEN + 10), "max_output_tokens": 4}, 400, {
        "message": f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, "
                   f"your prompt contains at least {MAX_MODEL_LEN + 1} input tokens, which "
                   "exceeds this limit even without any output tokens. Please reduce the length "
                   f"of the input prompt. (parameter=input_tokens, value={MAX_MODEL_LEN + 1})",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}),
])
def test_refused_responses(engine, body, status, error):
    response = engine.post("/v1/responses", {"model": engine.model, **body})
    assert response.status == status
    assert _json(response) == {"error": {**error, "message": error["message"].replace(
        "{model}", engine.model)}}


@pytest.mark.parametrize(("body", "errors"), [
    ({}, [("missing", "body.input")]),
    ({"input": 5}, [("string_type", "body.input"), ("list_type", "body.input")]),
])
def test_responses_validation_errors(engine, body, errors):
    response = engine.post("/v1/responses", {"model": engine.model, **body})
    assert response.status == 400
    error = _json(response)["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body.input", 400)
    assert error["message"].startswith(f"{len(errors)} validation error")
    assert re.findall(r"'type': '(\w+)', 'loc': '([\w.]+)'", error["message"]) == errors


# ---------------------------------------------------------------- Anthropic Messages API


def test_message_object(engine):
    client = _anthropic(engine)
    messages = [{"role": "user", "content": "hello there"}]
    result = client.messages.create(model=engine.model, max_tokens=5, messages=messages)
    assert result.id.startswith("chatcmpl-") and result.type == "message"
    assert result.role == "assistant" and result.model == engine.model
    assert result.stop_reason == "max_tokens" and result.stop_sequence is None
    (block,) = result.content
    assert block.type == "text" and isinstance(block.text, str)
    assert result.usage.output_tokens == 5 and result.usage.input_tokens >= 1
    raw = engine.post("/v1/messages", {"model": engine.model, "max_tokens": 2,
                                       "messages": messages})
    assert raw.status == 200
    # vLLM leaves out what is None (stop_sequence here).
    assert set(_json(raw)) == {"id", "type", "role", "content", "model", "stop_reason", "usage"}
    assert set(_json(raw)["usage"]) == {"input_tokens", "output_tokens"}
    # The prompt is the chat one: the same count as /v1/chat/completions and count_tokens.
    chat = engine.client().chat.completions.create(model=engine.model, messages=messages,
                                                   max_tokens=1)
    assert result.usage.input_tokens == chat.usage.prompt_tokens
    counted = client.messages.count_tokens(model=engine.model, messages=messages)
    assert counted.input_tokens == result.usage.input_tokens


def test_message_system_and_blocks(engine):
    client = _anthropic(engine)
    plain = client.messages.create(model=engine.model, max_tokens=2,
                                   messages=[{"role": "user", "content": "hi"}])
    told = client.messages.create(model=engine.model, max_tokens=2, system="Be brief.",
                                  messages=[{"role": "user", "content": "hi"}])
    assert told.usage.input_tokens > plain.usage.input_tokens
    blocks = client.messages.create(
        model=engine.model, max_tokens=2, system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert blocks.usage.input_tokens == told.usage.input_tokens
    counted = engine.post("/v1/messages/count_tokens", {
        "model": engine.model, "system": "Be brief.",
        "messages": [{"role": "user", "content": "hi"}]})
    n = told.usage.input_tokens
    assert counted.status == 200
    assert _json(counted) == {"input_tokens": n, "context_management": {
        "original_input_tokens": n}}


def test_message_stop_sequence(engine):
    client = _anthropic(engine)
    messages = [{"role": "user", "content": "stop somewhere"}]
    # extra_body: this SDK's Messages.create has no `temperature` any more; vLLM reads it.
    greedy = {"temperature": 0}
    whole = client.messages.create(model=engine.model, max_tokens=24, extra_body=greedy,
                                   messages=messages).content[0].text
    stop = _stop_in(whole)
    assert stop, whole
    cut = client.messages.create(model=engine.model, max_tokens=24, extra_body=greedy,
                                 messages=messages, stop_sequences=[stop])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == whole[: whole.find(stop)]


def test_message_stream_events(engine):
    response = engine.post("/v1/messages", {"model": engine.model, "max_tokens": 4,
                                            "stream": True,
                                            "messages": [{"role": "user", "content": "hello"}]})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _sse(response.data)
    names = [name for name, _ in events]
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert 1 <= len(deltas) <= 4
    assert names == (["message_start", "content_block_start"]
                     + ["content_block_delta"] * len(deltas)
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert (start["role"], start["content"], start["stop_reason"]) == ("assistant", [], None)
    assert start["id"].startswith("chatcmpl-") and start["usage"]["output_tokens"] == 0
    assert events[1][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": start["usage"]["input_tokens"],
                              "output_tokens": 4}
    assert events[-1][1] == {"type": "message_stop"}


def test_message_stream_with_the_sdk(engine):
    with _anthropic(engine).messages.stream(
            model=engine.model, max_tokens=3,
            messages=[{"role": "user", "content": "hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3
    events = list(_anthropic(engine).messages.create(
        model=engine.model, max_tokens=2, stream=True,
        messages=[{"role": "user", "content": "hello"}]))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"model": "no/such-model", "max_tokens": 2}, 404, {
        "type": "NotFoundError",
        "message": "The model `no/such-model` does not exist. Valid aliases: {model}."}),
    ({"max_tokens": MAX_MODEL_LEN + 1}, 400, {
        "type": "BadRequestError",
        "message": f"max_completion_tokens={MAX_MODEL_LEN + 1} cannot be greater than "
                   f"max_model_len={MAX_MODEL_LEN}. Please request fewer output tokens. "
                   f"(parameter=max_completion_tokens, value={MAX_MODEL_LEN + 1})"}),
    ({"max_tokens": 2, "messages": []}, 400, {
        "type": "BadRequestError",
        "message": "Cannot apply chat template to an empty conversation. Provide at least one "
                   "message."}),
])
def test_messages_refusals_are_anthropic_shaped(engine, body, status, error):
    response = engine.post("/v1/messages", {
        "model": engine.model, "messages": [{"role": "user", "content": "hi"}], **body})
    assert response.status == status
    assert _json(response) == {"type": "error", "error": {
        **error, "message": error["message"].replace("{model}", engine.model)}}


def test_messages_errors_through_the_sdk(engine):
    client = _anthropic(engine)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no/such-model", max_tokens=2,
                               messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "NotFoundError"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no/such-model",
                                     messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(("path", "body", "param", "kind"), [
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]},
     "body.max_tokens", "missing"),
    ("/v1/messages", {"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]},
     "body.max_tokens", "value_error"),
    ("/v1/messages", {"max_tokens": 2}, "body.messages", "missing"),
    ("/v1/messages", {"max_tokens": 2, "messages": "hi"}, "body.messages", "list_type"),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "bot", "content": "hi"}]},
     "body.messages.0.role", "literal_error"),
    ("/v1/messages/count_tokens", {}, "body.messages", "missing"),
])
def test_messages_validation_errors_are_openai_shaped(engine, path, body, param, kind):
    """What pydantic refuses never reaches vLLM's Anthropic translation: it comes back in the
    shape of every other validation error."""
    response = engine.post(path, {"model": engine.model, **body})
    assert response.status == 400
    error = _json(response)["error"]
    assert set(_json(response)) == {"error"}
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", param, 400)
    assert error["message"].startswith("1 validation error:\n")
    assert f"'type': '{kind}', 'loc': '{param}'" in error["message"]
