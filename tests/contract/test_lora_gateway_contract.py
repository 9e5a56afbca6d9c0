"""LoRA adapters of the catalog through the gateway, on the sim and on a real vLLM alike: the
first call for an adapter loads it into an engine of its base (`runtimes.lora`), the answer is
the adapter's (its name as `model`), at most the base's `max_loras` stay loaded (the least
recently used is unloaded from the engine), and an adapter the engine lost is loaded again."""

from __future__ import annotations

import time

import pytest

from tests.contract.conftest import GATEWAY_ADAPTERS, MAX_LORAS, gateway_adapter
from tests.harness import wait_for


def _served(lora_engine) -> set[str]:
    return {m["id"] for m in lora_engine.get("/v1/models").json()["data"]}


def _through_gateway(lora_engine, model: str, prompt: str = "the lora") -> dict:
    answer = lora_engine.gateway().completions.create(model=model, prompt=prompt, max_tokens=4,
                                                      temperature=0)
    return answer.model_dump()


@pytest.fixture
def names(lora_engine) -> list[str]:
    names = [gateway_adapter(lora_engine.model, n) for n in GATEWAY_ADAPTERS]
    yield names
    for name in names:  # leave the engine as the other LoRA tests expect it
        lora_engine.post("/v1/unload_lora_adapter", {"lora_name": name})


def test_an_adapter_is_loaded_on_first_use_and_answers_as_itself(lora_engine, names):
    a = names[0]
    assert a not in _served(lora_engine)
    answer = _through_gateway(lora_engine, a)
    assert answer["model"] == a and answer["usage"]["completion_tokens"] == 4
    assert a in _served(lora_engine)
    base = _through_gateway(lora_engine, lora_engine.model)
    if lora_engine.kind == "vllm":  # the real adapter changes the real model's greedy choice
        assert answer["choices"][0]["text"] != base["choices"][0]["text"]


def test_at_most_max_loras_stay_loaded_least_recently_used_first_out(lora_engine, names):
    assert MAX_LORAS == 2 and len(names) == 3
    a, b, c = names
    _through_gateway(lora_engine, a)
    _through_gateway(lora_engine, b)
    time.sleep(1.1)  # past the loader's touch throttle: a is now used after b
    _through_gateway(lora_engine, a)
    _through_gateway(lora_engine, c)
    served = _served(lora_engine)
    assert {a, c} <= served and b not in served, served


def test_an_adapter_the_engine_lost_is_loaded_again(lora_engine, names):
    a = names[0]
    _through_gateway(lora_engine, a)
    unload = lora_engine.post("/v1/unload_lora_adapter", {"lora_name": a})
    assert unload.status == 200, unload.data
    wait_for(lambda: a not in _served(lora_engine), 5, what="the unload")
    answer = lora_engine.gateway().chat.completions.create(
        model=a, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.model == a and a in _served(lora_engine)
