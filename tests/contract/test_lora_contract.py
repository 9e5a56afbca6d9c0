"""The LoRA contract: loading, serving and unloading adapters at run time, checked against the
`sim` and a real vLLM alike (each test runs on both, started with `--enable-lora --max-loras 2
--max-lora-rank 8` and VLLM_ALLOW_RUNTIME_LORA_UPDATING). What the gateway must know to drive
vLLM's adapters is what these tests pin: statuses, bodies and the /v1/models listing.

The adapters are tiny ones made here for the tiny model (`runtimes.tiny_lora`): one in a
directory, one in the engines' HF cache under a repo id, one of a rank the engines refuse and a
directory with a config but no weights. Each test uses adapter names of its own and unloads
what it loaded, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtimes.tiny_lora import (
    ADAPTER_CONFIG,
    TINY_LORA_REPO,
    TinyLora,
    adapter_files,
    write_adapter,
    write_adapter_dir,
)
from tests.contract.conftest import MAX_LORA_RANK, MAX_LORAS

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_hf_home) -> dict[str, str]:
    """Where each test adapter is, as a `lora_path`."""
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(tiny_hf_home, TINY_LORA_REPO, TinyLora(seed=4))
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / ADAPTER_CONFIG).write_bytes(adapter_files(TinyLora())[ADAPTER_CONFIG])
    return {
        "local": str(write_adapter_dir(root / "rank-8", TinyLora(seed=1))),
        "other": str(write_adapter_dir(root / "rank-8-other", TinyLora(seed=2))),
        "third": str(write_adapter_dir(root / "rank-8-third", TinyLora(seed=3))),
        "too-big": str(write_adapter_dir(root / "rank-16",
                                         TinyLora(seed=5, rank=2 * MAX_LORA_RANK))),
        "no-weights": str(no_weights),
        "hub": TINY_LORA_REPO,
    }


def _load(engine, name: str, path: str, **more):
    return engine.post(LOAD, {"lora_name": name, "lora_path": path, **more})


def _unload(engine, name: str):
    return engine.post(UNLOAD, {"lora_name": name})


def _error(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    return json.loads(response.data)["error"]


def _listed(engine) -> dict[str, dict]:
    return {m["id"]: m for m in json.loads(engine.get("/v1/models").data)["data"]}


def _complete(engine, model: str, **more):
    body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 6,
            "ignore_eos": True, **more}
    return engine.post("/v1/completions", body)


def _success(response, text: str) -> None:
    assert response.status == 200, response.data
    # A plain sentence, not JSON: vLLM sends it without a Content-Type, the sim as octets.
    assert response.data.decode() == text
    assert not response.headers.get("Content-Type", "").startswith("application/json")


def test_load_serve_and_unload_an_adapter(lora_engine, adapters):
    engine = lora_engine
    _success(_load(engine, "t-local", adapters["local"]),
             "Success: LoRA adapter 't-local' added successfully.")
    listed = _listed(engine)
    assert list(listed) == [engine.model, "t-local"]  # the base first, then the adapters
    card = listed["t-local"]
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["parent"] == engine.model and card["root"] == adapters["local"]
    assert card["max_model_len"] is None and listed[engine.model]["parent"] is None

    served = _complete(engine, "t-local")
    assert served.status == 200, served.data
    body = json.loads(served.data)
    assert body["model"] == "t-local"  # the answer names the adapter, not the base
    assert body["usage"]["completion_tokens"] == 6
    chat = engine.client().chat.completions.create(
        model="t-local", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model == "t-local" and chat.usage.completion_tokens == 3
    stream = engine.client().completions.create(model="t-local", prompt="hi", max_tokens=3,
                                                stream=True)
    assert {chunk.model for chunk in stream} == {"t-local"}

    again = _load(engine, "t-local", adapters["local"])
    assert again.status == 400
    assert _error(again) == {
        "message": "The lora adapter 't-local' has already been loaded. If you want to load "
                   "the adapter in place, set 'load_inplace' to True.",
        "type": "InvalidUserInput", "param": None, "code": 400}
    _success(_load(engine, "t-local", adapters["other"], load_inplace=True),
             "Success: LoRA adapter 't-local' added successfully.")
    assert _listed(engine)["t-local"]["root"] == adapters["other"]

    _success(_unload(engine, "t-local"), "Success: LoRA adapter 't-local' removed successfully.")
    assert list(_listed(engine)) == [engine.model]
    gone = _complete(engine, "t-local")
    assert gone.status == 404
    assert _error(gone) == {
        "message": f"The model `t-local` does not exist. Valid aliases: {engine.model}.",
        "type": "NotFoundError", "param": "model", "code": 404}
    twice = _unload(engine, "t-local")
    assert twice.status == 404
    assert _error(twice) == {"message": "The lora adapter 't-local' cannot be found.",
                             "type": "NotFoundError", "param": None, "code": 404}


def test_an_adapter_changes_the_answer(lora_engine, adapters):
    engine = lora_engine
    _success(_load(engine, "t-greedy", adapters["local"]),
             "Success: LoRA adapter 't-greedy' added successfully.")
    try:
        texts = {}
        for model in (engine.model, "t-greedy"):
            response = _complete(engine, model, temperature=0, max_tokens=8)
            assert response.status == 200, response.data
            texts[model] = json.loads(response.data)["choices"][0]["text"]
        assert texts[engine.model] != texts["t-greedy"], texts
        # Greedy decoding with the same adapter is repeatable: the adapter is what differs.
        again = json.loads(_complete(engine, "t-greedy", temperature=0, max_tokens=8).data)
        assert again["choices"][0]["text"] == texts["t-greedy"]
    finally:
        _unload(engine, "t-greedy")


def test_an_adapter_by_repo_id_from_the_hf_cache(lora_engine, adapters):
    engine = lora_engine
    _success(_load(engine, "t-hub", adapters["hub"]),
             "Success: LoRA adapter 't-hub' added successfully.")
    try:
        assert _listed(engine)["t-hub"]["root"] == TINY_LORA_REPO  # as given, not resolved
        served = _complete(engine, "t-hub")
        assert served.status == 200 and json.loads(served.data)["model"] == "t-hub"
    finally:
        _success(_unload(engine, "t-hub"), "Success: LoRA adapter 't-hub' removed successfully.")


def test_adapters_that_cannot_be_loaded(lora_engine, adapters, tmp_path):
    engine = lora_engine
    missing = _load(engine, "t-missing", str(tmp_path / "no-such-adapter"))
    assert missing.status == 404
    # vLLM hides file paths in every error message it sends.
    assert _error(missing) == {"message": "Loading lora t-missing failed: No adapter found for "
                                          "<path>", "type": "NotFoundError", "param": None,
                               "code": 404}
    not_cached = _load(engine, "t-no-repo", "local/no-such-lora")
    assert not_cached.status == 404
    assert _error(not_cached)["message"] == ("Loading lora t-no-repo failed: No adapter found "
                                             "for local/no-such-lora")
    too_big = _load(engine, "t-rank", adapters["too-big"])
    assert too_big.status == 500
    assert _error(too_big) == {
        "message": "Call to add_lora method failed: Worker failed with error 'LoRA rank "
                   f"{2 * MAX_LORA_RANK} is greater than max_lora_rank {MAX_LORA_RANK}.', "
                   "please check the stack trace above for the root cause",
        "type": "InternalServerError", "param": None, "code": 500}
    empty = _load(engine, "t-empty", adapters["no-weights"])
    assert empty.status == 500
    assert _error(empty)["message"] == (
        "Call to add_lora method failed: Worker failed with error '<path> doesn't contain "
        "tensors', please check the stack trace above for the root cause")
    base = _load(engine, engine.model, adapters["local"])
    assert base.status == 400
    assert _error(base) == {"message": f"The lora adapter '{engine.model}' conflicts with a "
                                       "served base model.", "type": "InvalidUserInput",
                            "param": None, "code": 400}
    assert list(_listed(engine)) == [engine.model]  # nothing of that was registered


def test_more_adapters_than_max_loras_are_all_served(lora_engine, adapters):
    """--max-loras bounds the adapters of one batch, not how many are registered: vLLM's
    worker keeps --max-cpu-loras (default --max-loras) loaded, drops the least recently used
    one and loads it again from its path when it is asked for."""
    engine = lora_engine
    names = [f"t-many-{i}" for i in range(MAX_LORAS + 1)]
    paths = [adapters["local"], adapters["other"], adapters["third"]]
    try:
        for name, path in zip(names, paths, strict=True):
            _success(_load(engine, name, path), f"Success: LoRA adapter '{name}' added "
                                                "successfully.")
        assert list(_listed(engine)) == [engine.model, *names]
        with ThreadPoolExecutor(len(names)) as pool:
            served = list(pool.map(lambda name: _complete(engine, name), names * 2))
        assert [r.status for r in served] == [200] * len(served)
        assert [json.loads(r.data)["model"] for r in served] == names * 2
    finally:
        for name in names:
            _unload(engine, name)
    assert list(_listed(engine)) == [engine.model]


def test_malformed_load_and_unload_calls(lora_engine, adapters):
    engine = lora_engine
    no_path = engine.post(LOAD, {"lora_name": "t-bad"})
    assert no_path.status == 400
    assert _error(no_path) == {
        "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.lora_path', "
                   "'msg': 'Field required', 'input': '<dict of 1 items>'}",
        "type": "Bad Request", "param": "body.lora_path", "code": 400}
    number = engine.post(LOAD, {"lora_name": 5, "lora_path": adapters["local"]})
    assert number.status == 400 and _error(number)["param"] == "body.lora_name"
    empty = engine.post(LOAD, {"lora_name": "", "lora_path": adapters["local"]})
    assert empty.status == 400
    assert _error(empty) == {"message": "Both 'lora_name' and 'lora_path' must be provided.",
                             "type": "InvalidUserInput", "param": None, "code": 400}
    unnamed = engine.post(UNLOAD, {"lora_name": ""})
    assert unnamed.status == 400
    assert _error(unnamed)["message"] == ("'lora_name' needs to be provided to unload a LoRA "
                                          "adapter.")
    nothing = engine.post(UNLOAD, {})
    assert nothing.status == 400 and _error(nothing)["param"] == "body.lora_name"
    data = json.dumps({"lora_name": "t-bad", "lora_path": adapters["local"]}).encode()
    as_text = engine.post(LOAD, data, content_type="text/plain")
    assert as_text.status == 400
    assert _error(as_text) == {"message": "1 validation error:\n  Unsupported Media Type: Only "
                                          "'application/json' is allowed",
                               "type": "Bad Request", "param": None, "code": 400}
    assert list(_listed(engine)) == [engine.model]
