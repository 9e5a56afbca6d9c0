"""`AdapterLoader` and the router's adapter affinity against a real Redis and a real sim engine
started with LoRA (`--enable-lora --max-loras 2`): loads on first use, at most `max_loras`
per engine with the least recently used unloaded, loads again what the engine lost, and
refuses what the engine refuses."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from runtimes.catalog import AdapterSpec, ModelSpec
from runtimes.lora import AdapterLoader, AdapterLoadError
from runtimes.registry import READY, RuntimeRecord, RuntimeRegistry
from runtimes.routing import RuntimeRouter
from runtimes.tiny_lora import TinyLora, write_adapter_dir
from tests.runtimes.test_sim import launch, stop

BASE = ModelSpec(id="base", engine="sim", serves_adapters=True, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, AdapterSpec]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: AdapterSpec(id=f"base/{name}", base="base",
                              path=str(write_adapter_dir(root / name, TinyLora(seed=seed))))
            for seed, name in enumerate(("a", "b", "c"), start=1)}


@pytest.fixture
def engine(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    sim = launch(tmp_path, "--model", "base", "--enable-lora", "--max-loras", "2",
                 "--max-lora-rank", "8")
    sim.wait_until_healthy()
    yield sim
    stop(sim)


def _record(sim, instance_id: str = "rt-1") -> RuntimeRecord:
    return RuntimeRecord(id=instance_id, model="base", engine="sim", backend="process",
                         state=READY, host="127.0.0.1", port=sim.port)


def _served(sim) -> set[str]:
    with urllib.request.urlopen(f"{_record(sim).endpoint}/v1/models", timeout=5) as answer:
        return {m["id"] for m in json.load(answer)["data"]}


def test_loads_on_first_use_and_unloads_the_least_recently_used(redis_db, engine, adapters):
    registry = RuntimeRegistry(redis_db, prefix="test")
    loader = AdapterLoader(registry)
    record = _record(engine)
    loader.ensure(record, BASE, adapters["a"])
    loader.ensure(record, BASE, adapters["b"])
    assert _served(engine) == {"base", "base/a", "base/b"}
    time.sleep(1.1)  # past the touch throttle: a's use is noted
    loader.ensure(record, BASE, adapters["a"])
    loader.ensure(record, BASE, adapters["c"])  # b is the least recently used now
    assert _served(engine) == {"base", "base/a", "base/c"}
    assert loader.loaded("rt-1") == ["base/a", "base/c"]
    # The engine lost one (restarted, or another client unloaded it): reload puts it back.
    request = urllib.request.Request(f"{record.endpoint}/v1/unload_lora_adapter",
                                     data=json.dumps({"lora_name": "base/c"}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()
    loader.reload(record, BASE, adapters["c"])
    assert _served(engine) == {"base", "base/a", "base/c"}
    # The registry forgets an instance's adapters with its record.
    registry.remove("rt-1")
    assert loader.loaded("rt-1") == []


def test_what_the_engine_refuses_is_an_error_and_nothing_is_noted(redis_db, engine, tmp_path):
    loader = AdapterLoader(RuntimeRegistry(redis_db, prefix="test"))
    record = _record(engine)
    missing = AdapterSpec(id="base/missing", base="base", path=str(tmp_path / "nowhere"))
    with pytest.raises(AdapterLoadError) as refused:
        loader.ensure(record, BASE, missing)
    assert refused.value.status == 502 and "No adapter found" in str(refused.value)
    too_big = AdapterSpec(id="base/big", base="base", path=str(write_adapter_dir(
        tmp_path / "big", TinyLora(seed=9, rank=16))))
    with pytest.raises(AdapterLoadError) as refused:
        loader.ensure(record, BASE, too_big)  # rank 16 over --max-lora-rank 8
    assert "greater than max_lora_rank" in str(refused.value)
    assert loader.loaded("rt-1") == [] and _served(engine) == {"base"}


def test_an_engine_that_is_gone_is_a_502(redis_db, adapters):
    loader = AdapterLoader(RuntimeRegistry(redis_db, prefix="test"), timeout=2)
    gone = RuntimeRecord(id="rt-gone", model="base", engine="sim", backend="process",
                         state=READY, host="127.0.0.1", port=1)
    with pytest.raises(AdapterLoadError) as refused:
        loader.ensure(gone, BASE, adapters["a"])
    assert refused.value.status == 502


def test_the_router_prefers_a_replica_that_has_the_adapter(redis_db):
    registry = RuntimeRegistry(redis_db, prefix="test")
    for instance_id, port in (("rt-1", 41001), ("rt-2", 41002)):
        registry.create(RuntimeRecord(id=instance_id, model="base", engine="sim",
                                      backend="process", state=READY, host="127.0.0.1",
                                      port=port))
    router, loader = RuntimeRouter(registry, cache_seconds=0), AdapterLoader(registry)
    redis_db.zadd(registry.key("lora", "rt-2"), {"base/a": time.time()})
    inflight = {"rt-1": 0, "rt-2": 5}
    have = loader.loaded_on(router.ready("base"), "base/a")
    assert have == {"rt-2"}
    assert router.pick("base", inflight, prefer=have).id == "rt-2"  # affinity over load
    assert router.pick("base", inflight).id == "rt-1"  # a base call: the least loaded
    # No replica has it: the least loaded, which then loads it.
    assert router.pick("base", inflight, prefer=loader.loaded_on(
        router.ready("base"), "base/b")).id == "rt-1"
