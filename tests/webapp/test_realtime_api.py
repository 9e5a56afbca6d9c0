"""The realtime API through the real gateway, with the official openai SDK as the client."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import raw_post, warm


@pytest.fixture(scope="module", autouse=True)
def fast_model_ready(stack):
    warm(stack, "sim/fast")


def test_completion_matches_engine_shape(client):
    result = client.completions.create(model="sim/fast", prompt="hello there", max_tokens=7)
    assert result.object == "text_completion"
    assert result.model == "sim/fast"
    assert result.usage.completion_tokens == 7
    assert result.choices[0].finish_reason == "length"
    again = client.completions.create(model="sim/fast", prompt="hello there", max_tokens=7)
    assert again.choices[0].text == result.choices[0].text  # the sim is deterministic


def test_chat_completion(client):
    result = client.chat.completions.create(
        model="sim/fast", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.usage.completion_tokens == 5
    assert result.choices[0].message.content


def test_streamed_completion_equals_plain_one(client):
    plain = client.completions.create(model="sim/fast", prompt="stream me", max_tokens=12)
    chunks = list(client.completions.create(model="sim/fast", prompt="stream me", max_tokens=12,
                                            stream=True))
    assert len(chunks) >= 12
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def test_streamed_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="sim/fast", messages=[{"role": "user", "content": "count"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_stream_headers_say_no_buffering(stack):
    response = raw_post(stack, "/v1/completions",
                        {"model": "sim/fast", "prompt": "x", "max_tokens": 3, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.data.rstrip().endswith(b"data: [DONE]")


def test_models_lists_catalog_with_state(client):
    models = {m.id: m for m in client.models.list().data}
    assert "sim/fast" in models and "sim/broken" in models
    assert models["sim/fast"].model_extra["state"] == "ready"


def test_request_id_is_kept_and_returned(stack):
    response = raw_post(stack, "/v1/completions",
                        {"model": "sim/fast", "prompt": "x", "max_tokens": 1},
                        headers={"X-Request-Id": "trace-abc-123"})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "trace-abc-123"
    generated = raw_post(stack, "/v1/completions",
                         {"model": "sim/fast", "prompt": "x", "max_tokens": 1})
    assert len(generated.headers["X-Request-Id"]) == 32


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no/such-model", prompt="x")
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_engine_errors_come_back_in_the_openai_shape(client):
    # The engine, not the gateway, knows its context length: its 400 is passed on.
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="sim/fast", prompt="x", max_tokens=100_000)
    assert set(caught.value.body) >= {"message", "type", "code"}


def _error(response) -> dict:
    body = json.loads(response.data)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        ({"prompt": "x"}, "invalid_value", "model"),
        ({"model": "sim/fast"}, "invalid_value", "prompt"),
        ({"model": "sim/fast", "prompt": "x", "max_tokens": "ten"}, "invalid_value", "max_tokens"),
        ({"model": "sim/fast", "prompt": "x", "max_tokens": 0}, "invalid_value", "max_tokens"),
        ({"model": "sim/fast", "prompt": "x", "stream": "yes"}, "invalid_value", "stream"),
        ({"model": "sim/fast", "prompt": {"a": 1}}, "invalid_value", "prompt"),
        ({"model": 42, "prompt": "x"}, "invalid_value", "model"),
    ],
)
def test_bad_completion_bodies_are_400(stack, body, code, param):
    response = raw_post(stack, "/v1/completions", body)
    assert response.status == 400
    error = _error(response)
    assert error["code"] == code
    assert error["param"] == param


def test_bad_chat_messages_are_400(stack):
    response = raw_post(stack, "/v1/chat/completions", {"model": "sim/fast", "messages": []})
    assert response.status == 400
    assert _error(response)["param"] == "messages"
    response = raw_post(stack, "/v1/chat/completions",
                        {"model": "sim/fast", "messages": [{"content": "no role"}]})
    assert response.status == 400


def test_huge_body_is_413(stack):
    body = {"model": "sim/fast", "prompt": "x" * (300 * 1024)}
    response = raw_post(stack, "/v1/completions", body)
    assert response.status == 413
    assert _error(response)["code"] == "request_too_large"


def test_unknown_fields_pass_through_to_the_engine(client):
    result = client.completions.create(
        model="sim/fast", prompt="x", max_tokens=4, extra_body={"top_k": 5, "min_p": 0.1}
    )
    assert result.usage.completion_tokens == 4


def test_unknown_route_and_wrong_method_are_openai_shaped(stack):
    response = raw_post(stack, "/v1/nope", {"x": 1})
    assert response.status == 404 and _error(response)["code"] == "not_found"
    import urllib3

    response = urllib3.request("GET", f"{stack.base_url}/v1/completions", retries=False)
    assert response.status == 405 and _error(response)["code"] == "method_not_allowed"
