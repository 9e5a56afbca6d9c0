"""Streams through the gateway: clients that hang up, engines that die mid-answer."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKENS, raw_post, ready_records, warm
from tests.harness import wait_for


def start_and_wait(stack, registry, model: str) -> None:
    """Start `model`'s engine with one cold call, then wait for it (without calling it)."""
    if not ready_records(registry, model):
        raw_post(stack, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1})
    wait_for(lambda: ready_records(registry, model), 30, what=f"{model} ready")


def engine_metrics(registry, model: str) -> dict[str, float]:
    [record] = ready_records(registry, model)
    text = urllib3.request("GET", f"{record.endpoint}/metrics").data.decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def open_stream(stack, model: str, max_tokens: int) -> socket.socket:
    """Start a streamed call on a raw socket and read until the first bytes of the answer."""
    body = json.dumps({"model": model, "prompt": "tell me", "max_tokens": max_tokens,
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKENS['realtime']}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


@pytest.mark.parametrize("model", ["sim/stream", "sim/silent"])
def test_client_hanging_up_closes_the_engine_request_within_a_second(stack, registry, model):
    # sim/stream sends a token every 150 ms; sim/silent says nothing for 20 s, so only the
    # gateway's hang-up watcher can notice the client is gone.
    start_and_wait(stack, registry, model)
    before = engine_metrics(registry, model).get("sim:client_disconnects_total", 0.0)
    sock = open_stream(stack, model, max_tokens=200)
    time.sleep(0.5)
    assert engine_metrics(registry, model)["vllm:num_requests_running"] >= 1
    sock.close()
    hung_up = time.monotonic()
    wait_for(
        lambda: engine_metrics(registry, model).get("sim:client_disconnects_total", 0) > before,
        5, what="the engine to see the hang-up",
    )
    assert time.monotonic() - hung_up < 1.0
    wait_for(lambda: engine_metrics(registry, model)["vllm:num_requests_running"] == 0, 2,
             what="the engine slot to be freed")


def test_engine_crashing_mid_stream_ends_the_stream_with_an_error(stack, registry):
    model = "sim/crashy"  # dies in the middle of its second request
    warm(stack, model)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=TOKENS["realtime"],
                           max_retries=0, timeout=30)
    received = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.completions.create(model=model, prompt="go", max_tokens=60,
                                               stream=True):
            received.append(chunk.choices[0].text)
    assert time.monotonic() - started < 10  # an error, never a hang
    assert received, "some tokens arrived before the crash"
    assert "stopped in the middle" in str(caught.value)
    # The runtime is noticed dead, and the next demand starts it again.
    wait_for(lambda: not ready_records(registry, model), 10, what="crash noticed")
    warm(stack, model)
    registry.reset_model(model)


def test_gateway_answers_502_not_500_when_the_engine_refuses(stack, registry):
    model = "sim/fast"
    warm(stack, model)
    [record] = ready_records(registry, model)
    # Make the registry point at a port nobody listens on, while it still says "ready".
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    registry.transition(record.id, None, port=dead_port)
    try:
        time.sleep(0.7)  # past the web workers' registry cache
        response = urllib3.request(
            "POST", f"{stack.base_url}/v1/completions",
            body=json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode(),
            headers={"Authorization": f"Bearer {TOKENS['realtime']}",
                     "Content-Type": "application/json"},
            retries=False,
        )
        assert response.status == 502
        error = json.loads(response.data)["error"]
        assert error["code"] == "engine_unreachable"
        assert "Traceback" not in response.data.decode()
    finally:
        registry.transition(record.id, None, port=record.port)
