"""Table tests of the policy where GPUs are short: eviction (who, stop or drain, what protects an
engine), weights still downloading, scale-out, and batch admission caps. `plan` and
`batch_caps` are pure: each case is a hand-built snapshot and the exact actions it must give."""

from __future__ import annotations

import dataclasses

from runtimes.catalog import ModelSpec
from runtimes.engines import EngineLoad
from runtimes.policy import batch_caps, plan
from runtimes.registry import READY, SLEEPING
from tests.runtimes.test_policy import IDLE, NOW, check_reasons, live, record, snapshot, summary

HOST = {"gpu-host": (0, 1)}  # one host, two GPUs: room for one model of two GPUs


def gpu_spec(model: str, gpus: int = 2, **changes) -> ModelSpec:
    return ModelSpec(id=model, engine="sim", gpus=gpus, idle_timeout_seconds=IDLE,
                     fingerprint=f"fp-{model}", **changes)


CATALOG = (gpu_spec("a"), gpu_spec("b"))


def on_gpus(instance_id: str, model: str, state: str = READY, gpus=(0, 1), **kwargs):
    return dataclasses.replace(record(instance_id, model, state, **kwargs), gpus=tuple(gpus),
                               gpu_host="gpu-host")


def in_use(*records) -> dict:
    """Records plus the backend's agreement, each used a moment ago (not idle)."""
    return {**live(*records), "last_used": {r.id: NOW - 5 for r in records}}


def plan_for(*records, **values):
    snap = snapshot(CATALOG, gpu_inventory=HOST, **in_use(*records), **values)
    actions = plan(snap)
    check_reasons(actions)
    return actions


def test_a_realtime_call_for_a_cold_model_evicts_the_idle_one():
    actions = plan_for(on_gpus("a-1", "a"), demand={"b": NOW - 1})
    assert summary(actions) == [("stop", "a", "a-1")]
    assert actions[0].evicted_for == "b"


def test_an_engine_with_calls_in_flight_is_drained_not_stopped():
    actions = plan_for(on_gpus("a-1", "a"), demand={"b": NOW - 1}, inflight={"a-1": 3})
    assert summary(actions) == [("drain", "a", "a-1")]


def test_a_sleeping_engine_goes_before_an_awake_one():
    one_gpu = (gpu_spec("a", 1), gpu_spec("c", 1), gpu_spec("b", 1))
    snap = snapshot(one_gpu, gpu_inventory=HOST, demand={"b": NOW - 1},
                    **in_use(on_gpus("a-1", "a", gpus=(0,)),
                             on_gpus("c-1", "c", SLEEPING, gpus=(1,))))
    assert summary(plan(snap)) == [("stop", "c", "c-1")]


def test_an_engine_younger_than_min_lifetime_is_not_stopped_for_batch_work():
    actions = plan_for(on_gpus("a-1", "a", age=30.0), batch_pending={"b": 500}, min_lifetime=60.0)
    assert summary(actions) == []
    older = plan_for(on_gpus("a-1", "a", age=90.0), batch_pending={"b": 500}, min_lifetime=60.0)
    assert summary(older) == [("stop", "a", "a-1")]


def test_for_a_realtime_call_value_decides_not_age():
    """A young engine nobody has called lately costs no one anything: a waiting caller gets its
    GPU; one called every few seconds keeps it (the caller waits)."""
    idle = plan_for(on_gpus("a-1", "a", age=30.0), demand={"b": NOW - 1}, min_lifetime=60.0)
    assert summary(idle) == [("stop", "a", "a-1")]
    busy = plan_for(on_gpus("a-1", "a", age=30.0), demand={"b": NOW - 1}, min_lifetime=60.0,
                    arrivals={"a": 100})
    assert summary(busy) == []


def test_batch_work_never_pushes_out_realtime_traffic():
    busy = plan_for(on_gpus("a-1", "a"), batch_pending={"b": 500}, arrivals={"a": 4})
    assert summary(busy) == []
    quiet = plan_for(on_gpus("a-1", "a"), batch_pending={"b": 500})
    assert summary(quiet) == [("stop", "a", "a-1")]


def test_min_replicas_protects_the_last_warm_engine():
    catalog = (gpu_spec("a", min_replicas=1), gpu_spec("b"))
    snap = snapshot(catalog, gpu_inventory=HOST, demand={"b": NOW - 1},
                    **in_use(on_gpus("a-1", "a")))
    assert summary(plan(snap)) == []


def test_nothing_is_evicted_for_a_model_whose_weights_are_downloading():
    actions = plan_for(on_gpus("a-1", "a"), demand={"b": NOW - 1},
                       weights_missing=frozenset({"b"}), downloading=frozenset({"b"}))
    assert summary(actions) == []  # "a" keeps serving while b's weights arrive


def test_missing_weights_are_asked_for_without_evicting():
    actions = plan_for(on_gpus("a-1", "a"), demand={"b": NOW - 1},
                       weights_missing=frozenset({"b"}))
    # The start asks for the download (ensure_running claims no GPU before the weights are
    # here); "a" stays.
    assert summary(actions) == [("start", "b", "")]
    assert "downloaded first" in actions[0].reason


def test_once_the_weights_are_here_the_eviction_happens():
    actions = plan_for(on_gpus("a-1", "a"), demand={"b": NOW - 1},
                       weights_missing=frozenset(), downloading=frozenset())
    assert summary(actions) == [("stop", "a", "a-1")]


def test_a_busy_model_scales_out_onto_free_gpus():
    catalog = (gpu_spec("a", 1, max_replicas=2),)
    loads = {"a-1": EngineLoad(running=64, waiting=20)}
    snap = snapshot(catalog, gpu_inventory=HOST, engine_load=loads, scale_out_waiting=8.0,
                    **in_use(on_gpus("a-1", "a", gpus=(0,))))
    actions = plan(snap)
    assert summary(actions) == [("start", "a", "")]
    assert actions[0].replicas == 2
    calm = dataclasses.replace(snap, engine_load={"a-1": EngineLoad(running=64, waiting=2)})
    assert summary(plan(calm)) == []


def test_batch_caps_halve_when_the_engine_queues_and_grow_back_by_an_eighth():
    ready = in_use(on_gpus("a-1", "a"))
    queued = snapshot(CATALOG, engine_load={"a-1": EngineLoad(running=64, waiting=5)}, **ready)
    assert batch_caps(queued, {"a": 64}, 64) == {"a": 32}
    clear = snapshot(CATALOG, engine_load={"a-1": EngineLoad(running=30, waiting=0)}, **ready)
    assert batch_caps(clear, {"a": 32}, 64) == {"a": 40}
    # Realtime calls in flight come off the ceiling.
    assert batch_caps(dataclasses.replace(clear, inflight={"a-1": 10}), {"a": 64}, 64) == {"a": 54}


def test_the_batch_ceiling_follows_the_engines_concurrency():
    """An engine of 32 sequences: batch may fill 24 of them (two engines: 48), so realtime
    calls find a free sequence."""
    catalog = (gpu_spec("a", 1, max_concurrency=32, max_replicas=2),)
    two = in_use(on_gpus("a-1", "a", gpus=(0,)), on_gpus("a-2", "a", gpus=(1,)))
    snap = snapshot(catalog, **two)
    assert batch_caps(snap, {"a": 200}, 64) == {"a": 48}
    assert batch_caps(snap, {}, 64) == {"a": 48}  # never above the ceiling
