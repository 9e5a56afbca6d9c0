"""The sim engine's LoRA adapters (runtimes.sim.lora): the command line, the routes and what
vLLM 0.32.0 answers in each case (measured; the same calls on both engines are in
tests/contract/test_lora_contract.py). Real `python -m runtimes.sim` processes on loopback."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from runtimes.sim.__main__ import parse_args
from runtimes.sim.lora import (
    RUNTIME_UPDATING_ENV,
    LoraOptions,
    lora_options,
    resolve_adapter_path,
    sanitize,
)
from runtimes.tiny_lora import ADAPTER_CONFIG, TinyLora, write_adapter, write_adapter_dir
from tests.runtimes.test_sim import MODEL, http_call, launch, stop

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"


@pytest.fixture
def adapter(tmp_path) -> str:
    return str(write_adapter_dir(tmp_path / "adapter", TinyLora()))


@pytest.fixture
def start(tmp_path, monkeypatch):
    """Start a sim with these flags and, when `updating`, VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    started = []

    def run(*args: str, updating: str | None = "True", wait: bool = True):
        if updating is None:
            monkeypatch.delenv(RUNTIME_UPDATING_ENV, raising=False)
        else:
            monkeypatch.setenv(RUNTIME_UPDATING_ENV, updating)
        sim = launch(tmp_path, *args)
        started.append(sim)
        if wait:
            sim.wait_until_healthy()
        return sim

    yield run
    for sim in started:
        stop(sim)


def _post(sim, path: str, body: dict):
    status, headers, data = http_call("POST", f"{sim.url}{path}", body)
    return status, json.loads(data) if headers["Content-Type"].startswith(
        "application/json") else data.decode()


def _models(sim) -> list[dict]:
    return json.loads(http_call("GET", f"{sim.url}/v1/models")[2])["data"]


def test_the_command_line_and_the_environment():
    config = parse_args(["--model", "m", "--port", "0", "--enable-lora", "--max-loras", "3",
                         "--max-lora-rank", "8", "--max-cpu-loras", "4", "--lora-modules",
                         "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}', ""])
    assert config.lora == LoraOptions(enabled=True, max_loras=3, max_lora_rank=8,
                                      max_cpu_loras=4, modules=(("a", "/x"), ("b", "/y")),
                                      runtime_updating=config.lora.runtime_updating)
    assert parse_args(["--model", "m", "--port", "0"]).lora.enabled is False
    args = argparse.Namespace(enable_lora=True, max_loras=1, max_lora_rank=16,
                              max_cpu_loras=None, lora_modules=None)
    # vLLM's reading: "1" or "true", stripped, any case; nothing else.
    for value, allowed in (("True", True), (" 1 ", True), ("TRUE", True), ("yes", False),
                           ("0", False)):
        assert lora_options(args, {RUNTIME_UPDATING_ENV: value}).runtime_updating is allowed
    assert lora_options(args, {}).runtime_updating is False
    for bad in (["--max-lora-rank", "12"], ["--max-loras", "2", "--max-cpu-loras", "1"],
                ["--lora-modules", "{not json"]):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", "--port", "0", "--enable-lora", *bad])


def test_a_session_of_loads_and_unloads(start, adapter, tmp_path):
    sim = start("--enable-lora", "--max-loras", "1", "--max-lora-rank", "8")
    assert _post(sim, LOAD, {"lora_name": "x", "lora_path": adapter}) == (
        200, "Success: LoRA adapter 'x' added successfully.")
    status, error = _post(sim, LOAD, {"lora_name": "x", "lora_path": adapter})
    assert status == 400 and error["error"]["type"] == "InvalidUserInput"
    # Over --max-loras: registered all the same, as vLLM does.
    assert _post(sim, LOAD, {"lora_name": "y", "lora_path": adapter})[0] == 200
    cards = _models(sim)
    assert [c["id"] for c in cards] == [MODEL, "x", "y"]
    assert cards[1]["root"] == adapter and cards[1]["parent"] == MODEL
    for model in ("x", "y"):
        status, _, data = http_call("POST", f"{sim.url}/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200 and json.loads(data)["model"] == model
    assert _post(sim, UNLOAD, {"lora_name": "x"}) == (
        200, "Success: LoRA adapter 'x' removed successfully.")
    assert _post(sim, UNLOAD, {"lora_name": "x"}) == (404, {"error": {
        "message": "The lora adapter 'x' cannot be found.", "type": "NotFoundError",
        "param": None, "code": 404}})
    assert [c["id"] for c in _models(sim)] == [MODEL, "y"]
    status, error = _post(sim, "/v1/completions", {"model": "x", "prompt": "hi"})
    assert status == 404 and error["error"]["message"] == (
        f"The model `x` does not exist. Valid aliases: {MODEL}.")


def test_the_routes_need_the_environment(start, adapter):
    sim = start("--enable-lora", updating=None)
    for path in (LOAD, UNLOAD):
        assert _post(sim, path, {"lora_name": "x", "lora_path": adapter}) == (
            404, {"detail": "Not Found"})
    sim = start("--enable-lora", updating="yes")
    assert _post(sim, LOAD, {"lora_name": "x", "lora_path": adapter})[0] == 404


def test_without_enable_lora_every_load_fails_in_the_worker(start, adapter):
    sim = start()
    for path in (adapter, "/no/such/adapter"):  # the check comes before the path's
        assert _post(sim, LOAD, {"lora_name": "x", "lora_path": path}) == (500, {"error": {
            "message": "Call to add_lora method failed: Worker failed with error 'LoRA is not "
                       "enabled. Use --enable-lora to enable LoRA.', please check the stack "
                       "trace above for the root cause",
            "type": "InternalServerError", "param": None, "code": 500}})
    assert [c["id"] for c in _models(sim)] == [MODEL]


def test_the_rank_is_read_from_the_adapter_config(start, tmp_path):
    sim = start("--enable-lora", "--max-lora-rank", "16")
    fits = write_adapter_dir(tmp_path / "r16", TinyLora(rank=16))
    assert _post(sim, LOAD, {"lora_name": "r16", "lora_path": str(fits)})[0] == 200
    patterned = write_adapter_dir(tmp_path / "pattern", TinyLora(rank=8))
    config = json.loads((patterned / ADAPTER_CONFIG).read_text())
    (patterned / ADAPTER_CONFIG).write_text(json.dumps({**config, "rank_pattern": {"q_proj": 32}}))
    status, error = _post(sim, LOAD, {"lora_name": "p", "lora_path": str(patterned)})
    assert status == 500 and "'LoRA rank 32 is greater than max_lora_rank 16.'" in error[
        "error"]["message"]


def test_static_adapters_from_the_command_line(start, adapter):
    sim = start("--enable-lora", "--lora-modules", f"fixed={adapter}", updating=None)
    assert [(c["id"], c["root"]) for c in _models(sim)] == [(MODEL, MODEL), ("fixed", adapter)]
    status, _, data = http_call("POST", f"{sim.url}/v1/completions",
                                {"model": "fixed", "prompt": "hi", "max_tokens": 2})
    assert status == 200 and json.loads(data)["model"] == "fixed"


def test_a_static_adapter_that_cannot_load_stops_the_start(start, tmp_path):
    sim = start("--enable-lora", "--lora-modules", f"bad={tmp_path / 'none'}", wait=False)
    deadline = time.monotonic() + 15
    while sim.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.proc.returncode not in (None, 0)
    assert "Loading lora bad failed: No adapter found for <path>" in sim.stderr()


def test_adapter_paths_are_found_as_vllm_finds_them(tmp_path, monkeypatch, adapter):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_adapter_path("/not/there") == "/not/there"
    monkeypatch.chdir(tmp_path)
    assert resolve_adapter_path("adapter") == adapter
    assert resolve_adapter_path("~/x") == os.path.expanduser("~/x")
    assert resolve_adapter_path("local/lora") == "local/lora"  # not in the cache
    write_adapter(tmp_path / "hf", "local/lora", TinyLora())
    found = Path(resolve_adapter_path("local/lora"))
    assert found.is_dir() and found.parent.name == "snapshots"


def test_paths_are_hidden_in_messages_as_vllm_hides_them():
    assert sanitize("No adapter found for /tmp/a/b-c.d") == "No adapter found for <path>"
    assert sanitize("'/srv/x/y doesn't contain tensors'") == "'<path> doesn't contain tensors'"
    assert sanitize("bad /data/set/file.json here") == "bad <path> here"
    assert sanitize("local/no-such-lora") == "local/no-such-lora"
