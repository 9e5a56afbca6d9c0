"""The sim's Responses and Messages APIs where the contract suite cannot look: the store switched
off (the contract engines run with it on), and answers that say nothing at all. What is expected
was measured on vLLM 0.32.0 (docs/SIM_VS_VLLM.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.sim.responses import STORE_ENV, store_enabled
from tests.runtimes.test_sim import REPO_ROOT, SimProcess, free_port, http_call, stop

MODEL = "sim-responses-model"


def _launch(tmp_path: Path, store: str | None) -> SimProcess:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != STORE_ENV}
    if store is not None:
        env[STORE_ENV] = store
    stderr_path = tmp_path / f"sim-{port}.stderr"
    with stderr_path.open("w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtimes.sim", "--model", MODEL, "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file)
    sim = SimProcess(proc, port, stderr_path)
    sim.wait_until_healthy()
    return sim


@pytest.fixture(scope="module")
def unstored_sim(tmp_path_factory) -> Iterator[SimProcess]:
    sim = _launch(tmp_path_factory.mktemp("unstored"), None)
    yield sim
    stop(sim)


@pytest.fixture(scope="module")
def stored_sim(tmp_path_factory) -> Iterator[SimProcess]:
    sim = _launch(tmp_path_factory.mktemp("stored"), "1")
    yield sim
    stop(sim)


def _post(sim: SimProcess, path: str, body: dict) -> tuple[int, object]:
    status, headers, data = http_call("POST", f"{sim.url}{path}", body)
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        return status, [json.loads(block.split("\ndata: ", 1)[1])
                        for block in data.decode().split("\n\n") if block]
    return status, json.loads(data)


def test_store_variable_is_read_as_vllm_reads_it():
    assert not store_enabled({}) and not store_enabled({STORE_ENV: "0"})
    assert store_enabled({STORE_ENV: "1"}) and store_enabled({STORE_ENV: "2"})
    with pytest.raises(ValueError):  # vLLM does not start either
        store_enabled({STORE_ENV: "yes"})


def test_without_the_store_nothing_is_kept(unstored_sim):
    status, created = _post(unstored_sim, "/v1/responses", {
        "input": "keep me", "max_output_tokens": 2, "store": True})
    assert status == 200 and created["status"] == "incomplete"
    missing = {"error": {"message": f"Response with id '{created['id']}' not found.",
                         "type": "invalid_request_error", "param": "response_id", "code": 404}}
    assert http_call("GET", f"{unstored_sim.url}/v1/responses/{created['id']}")[0] == 404
    assert _post(unstored_sim, f"/v1/responses/{created['id']}/cancel", {}) == (404, missing)
    status, refused = _post(unstored_sim, "/v1/responses", {
        "input": "x", "max_output_tokens": 2, "background": True})
    assert status == 400 and refused["error"]["param"] == "background"
    assert refused["error"]["type"] == "invalid_request_error"
    assert "VLLM_ENABLE_RESPONSES_API_STORE=1" in refused["error"]["message"]


def test_with_the_store_a_stored_response_comes_back(stored_sim):
    status, created = _post(stored_sim, "/v1/responses", {"input": "keep", "max_output_tokens": 2})
    assert status == 200
    status, _, body = http_call("GET", f"{stored_sim.url}/v1/responses/{created['id']}")
    assert status == 200 and json.loads(body) == created
    status, unstored = _post(stored_sim, "/v1/responses", {
        "input": "keep", "max_output_tokens": 2, "store": False})
    assert http_call("GET", f"{stored_sim.url}/v1/responses/{unstored['id']}")[0] == 404


def test_an_answer_cut_before_its_first_word(stored_sim):
    """A stop string at once (every sim token starts with a space): vLLM's Responses message
    has no content part and its stream opens no item; Messages keeps one empty text block and
    its stream opens no content block."""
    status, body = _post(stored_sim, "/v1/responses", {
        "input": "x", "max_output_tokens": 5, "stop": [" "]})
    assert status == 200 and body["status"] == "completed"
    assert body["output"][0]["content"] == [] and body["usage"]["output_tokens"] == 1
    status, events = _post(stored_sim, "/v1/responses", {
        "input": "x", "max_output_tokens": 5, "stop": [" "], "stream": True})
    assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                           "response.completed"]
    assert events[-1]["response"]["output"] == []
    status, message = _post(stored_sim, "/v1/messages", {
        "model": MODEL, "max_tokens": 5, "stop_sequences": [" "],
        "messages": [{"role": "user", "content": "x"}]})
    assert message["content"] == [{"type": "text", "text": ""}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", " ")
    status, events = _post(stored_sim, "/v1/messages", {
        "model": MODEL, "max_tokens": 5, "stop_sequences": [" "], "stream": True,
        "messages": [{"role": "user", "content": "x"}]})
    assert [e["type"] for e in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": " "}
