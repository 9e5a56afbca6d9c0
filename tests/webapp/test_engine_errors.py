"""Engine errors reach the client in our envelope, never in vLLM's shape.

The sim engine answers errors as vLLM does (`type: "BadRequestError"`, an integer `code`); through
the stack the client must see OpenAI's `type`, a string `code`, the engine's message. Each shape
an engine may answer is rewritten (`runtimes.engine_errors`), and an error event in a stream is
rewritten by the relay, checked against a real HTTP server that streams like vLLM.
"""

from __future__ import annotations

import json
import socket
import threading

import openai
import pytest

from runtimes.engine_errors import normalise_engine_error
from runtimes.upstream import EngineClient
from tests.conftest import raw_post, warm
from webapp.relay import relay_stream


def rewritten(status: int, body: bytes) -> dict:
    envelope = json.loads(normalise_engine_error(status, body))
    assert set(envelope) == {"error"}
    error = envelope["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["code"], str) and error["code"]
    assert error["param"] is None or isinstance(error["param"], str)
    return error


VLLM_MESSAGE = ("This model's maximum context length is 4096 tokens. However, you requested "
                "5001 tokens (1 in the messages, 5000 in the completion).")


def test_nested_vllm_error():
    body = json.dumps({"error": {"message": VLLM_MESSAGE, "type": "BadRequestError",
                                 "param": None, "code": 400}}).encode()
    assert rewritten(400, body) == {"message": VLLM_MESSAGE, "type": "invalid_request_error",
                                    "code": "bad_request", "param": None}


def test_flat_vllm_error():
    body = json.dumps({"object": "error", "message": "`n` must be 1.", "type": "BadRequestError",
                       "param": "n", "code": 400}).encode()
    assert rewritten(400, body) == {"message": "`n` must be 1.", "type": "invalid_request_error",
                                    "code": "bad_request", "param": "n"}


def test_a_string_code_and_param_are_kept():
    body = json.dumps({"error": {"message": "too long", "type": "invalid_request_error",
                                 "param": "messages", "code": "context_length_exceeded"}})
    assert rewritten(400, body.encode()) == {
        "message": "too long", "type": "invalid_request_error",
        "code": "context_length_exceeded", "param": "messages"}


def test_non_string_param_is_dropped_and_unknown_model_named():
    body = json.dumps({"error": {"message": "The model `x` does not exist.",
                                 "type": "NotFoundError", "param": "model", "code": 404}})
    assert rewritten(404, body.encode())["code"] == "model_not_found"
    body = json.dumps({"error": {"message": "m", "type": "BadRequestError",
                                 "param": ["a", 1], "code": 400}})
    assert rewritten(400, body.encode())["param"] is None


def test_non_json_body():
    error = rewritten(502, b"<html><body>Bad Gateway</body></html>")
    assert error == {"message": "<html><body>Bad Gateway</body></html>", "type": "server_error",
                     "code": "engine_error", "param": None}
    assert len(rewritten(400, b"x" * 10_000)["message"]) == 500
    assert rewritten(400, b"\xff\xfe not utf-8")["type"] == "invalid_request_error"


def test_empty_body():
    assert rewritten(400, b"") == {
        "message": "The model's engine answered 400 with no explanation.",
        "type": "invalid_request_error", "code": "bad_request", "param": None}
    assert rewritten(503, b"  \n")["message"].endswith("answered 503 with no explanation.")


def test_server_errors():
    body = json.dumps({"error": {"message": "CUDA out of memory", "type": "InternalServerError",
                                 "param": None, "code": 500}}).encode()
    assert rewritten(500, body) == {"message": "CUDA out of memory", "type": "server_error",
                                    "code": "engine_error", "param": None}
    assert rewritten(503, b'{"object": "error", "message": "asleep", "code": 503}') == {
        "message": "asleep", "type": "server_error", "code": "engine_error", "param": None}


def test_fastapi_detail_bodies():
    assert rewritten(404, b'{"detail": "Not Found"}')["message"] == "Not Found"
    detail = [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]
    error = rewritten(422, json.dumps({"detail": detail}).encode())
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert json.loads(error["message"]) == detail


@pytest.mark.parametrize(("status", "type_", "code"), [
    (401, "invalid_request_error", "unauthorized"),
    (403, "permission_error", "forbidden"),
    (413, "invalid_request_error", "request_too_large"),
    (418, "invalid_request_error", "engine_error"),
    (429, "rate_limit_error", "rate_limit_exceeded"),
    (504, "server_error", "engine_error"),
])
def test_type_and_code_by_status(status, type_, code):
    body = json.dumps({"error": {"message": "m", "type": "SomeError", "code": status}}).encode()
    error = rewritten(status, body)
    assert (error["type"], error["code"]) == (type_, code)


# ---------------------------------------------------------------- through the stack


def test_sim_engine_error_reaches_the_client_in_our_envelope(stack, client):
    warm(stack, "sim/fast")
    # The engine, not the gateway, knows its context length (the sim's is 4096 tokens); the
    # words are vLLM's (tests/contract holds the sim to them).
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="sim/fast", prompt="x", max_tokens=5000)
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["code"] == "bad_request"
    assert caught.value.body["param"] == "max_tokens"
    assert caught.value.body["message"].startswith(
        "max_tokens=5000 cannot be greater than max_model_len=4096.")
    # A streamed call the engine refuses before streaming: the same envelope.
    response = raw_post(stack, "/v1/chat/completions",
                        {"model": "sim/fast", "messages": [{"role": "user", "content": "x"}],
                         "n": 2, "temperature": 0, "stream": True})
    assert response.status == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": {
        "message": "n must be 1 when using greedy sampling, got 2.",
        "type": "invalid_request_error", "code": "bad_request", "param": None}}


# ---------------------------------------------------------------- error events in a stream


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


TOKEN_EVENT = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":" hi"}]}\n\n'


class StreamingEngine:
    """A real HTTP server on loopback that answers one stream as vLLM does: an event per chunk,
    an error met mid-answer as a `data: {"error": ...}` event, then `[DONE]`."""

    def __init__(self, events: list[bytes]):
        self.events = events
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n"
                         + b"".join(_chunk(e) for e in self.events) + b"0\r\n\r\n")
            conn.recv(1)  # until the client closes

    def close(self) -> None:
        self.listener.close()


def relayed(events: list[bytes], on_first=None) -> list[bytes]:
    engine = StreamingEngine(events)
    try:
        upstream = EngineClient(1, 5, 5).send("127.0.0.1", engine.port, "/v1/completions",
                                              b"{}", "rid-stream")
        outcomes: list[str] = []
        chunks = [c for c in relay_stream(upstream, None, outcomes.append, on_first) if c]
        upstream.close()
        assert outcomes == ["complete"]
        return chunks
    finally:
        engine.close()


def test_error_events_in_a_stream_are_rewritten():
    nested = (b'data: {"error": {"message": "prompt too long", "type": "BadRequestError", '
              b'"param": null, "code": 400}}\n\n')
    flat = (b'data: {"object":"error","message":"engine died","type":"InternalServerError",'
            b'"param":null,"code":500}\n\n')
    chunks = relayed([TOKEN_EVENT, nested, flat + b"data: [DONE]\n\n"])
    assert chunks[0] == TOKEN_EVENT  # untouched, byte for byte
    assert chunks[1] == b"data: " + json.dumps({"error": {
        "message": "prompt too long", "type": "invalid_request_error", "code": "bad_request",
        "param": None}}).encode() + b"\n\n"
    event, _, rest = chunks[2].partition(b"\n\n")
    assert json.loads(event.removeprefix(b"data: ")) == {"error": {
        "message": "engine died", "type": "server_error", "code": "engine_error", "param": None}}
    assert rest == b"data: [DONE]\n\n"


def test_an_error_event_first_and_lookalikes():
    first = b'data: {"error": {"message": "bad", "type": "BadRequestError", "code": 400}}\n\n'
    broken = b'data: {"error": not json\n\n'
    firsts = []
    chunks = relayed([first, broken, b"data: [DONE]\n\n"], on_first=lambda: firsts.append(1))
    assert firsts == [1]
    assert json.loads(chunks[0].removeprefix(b"data: "))["error"]["type"] == (
        "invalid_request_error")
    assert chunks[1:] == [broken, b"data: [DONE]\n\n"]


def test_stream_through_the_stack_is_untouched(stack):
    warm(stack, "sim/fast")
    response = raw_post(stack, "/v1/completions",
                        {"model": "sim/fast", "prompt": "x", "max_tokens": 4, "stream": True})
    assert response.status == 200
    events = [e for e in response.data.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and all(b'"error"' not in e for e in events)
