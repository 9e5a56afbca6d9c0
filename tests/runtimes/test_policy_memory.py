"""Table tests of the policy on GPUs with memory: engines that fit share a GPU, an asleep engine
keeps only its context, eviction by value (who, sleep or stop, and when it is worth it), the
wake-up that needs its memory back, drain then sleep, and keep-alive and pre-warm from a model's
history. `plan` is pure: each case is a hand-built snapshot and the exact actions it gives."""

from __future__ import annotations

import dataclasses

from runtimes.catalog import ModelSpec
from runtimes.keepalive import CallHistory
from runtimes.policy import plan
from runtimes.registry import DRAINING, READY, SLEEPING
from tests.runtimes.test_policy import NOW, check_reasons, live, record, snapshot, summary

HOST = {"gpu": (0,)}
MEMORY = {"gpu": 80.0}
WINDOW = 300.0


def sized(model: str, weights: float, kv: float) -> ModelSpec:
    return ModelSpec(id=model, engine="vllm", gpus=1, weights_gb=weights, kv_cache_gb=kv,
                     args=("--enable-sleep-mode",), fingerprint=f"fp-{model}")


# Awake on an 80 GB GPU: big 44 GB, mid 42 GB, small 24 GB; asleep 1 GB each. big + mid never
# fit together; big + small do.
BIG, MID, SMALL, SMALL2 = (sized("big", 28, 14), sized("mid", 29.5, 10), sized("small", 16, 6),
                           sized("small2", 16, 6))
CATALOG = (BIG, MID, SMALL, SMALL2)
STARTS = {"big": 150.0, "mid": 100.0, "small": 60.0, "small2": 60.0}
WAKES = {"big": 4.0, "mid": 4.0, "small": 2.0, "small2": 2.0}


def gpu(instance_id: str, model: str, state: str = READY, **kwargs):
    return dataclasses.replace(record(instance_id, model, state, **kwargs), gpus=(0,),
                               gpu_host="gpu")


def plan_for(*records, used: dict | None = None, **values):
    """`plan` on one 80 GB GPU, every engine able to sleep; engines used `used[id]` s ago
    (default 5 s: not idle)."""
    values.setdefault("can_sleep", frozenset(s.id for s in CATALOG))
    values.setdefault("sleep_after_seconds", 120.0)
    last = {r.id: NOW - (used or {}).get(r.id, 5.0) for r in records}
    snap = snapshot(CATALOG, gpu_inventory=HOST, gpu_memory=MEMORY, start_seconds=STARTS,
                    wake_seconds=WAKES, arrivals_window=WINDOW, **live(*records),
                    last_used=last, **values)
    actions = plan(snap)
    check_reasons(actions)
    return actions


def per_second(rate: float) -> int:
    """Arrivals over the window for `rate` calls a second."""
    return round(rate * WINDOW)


# ---------------------------------------------------------------- sharing a GPU


def test_a_small_model_starts_beside_another_without_evicting_it():
    assert summary(plan_for(gpu("s-1", "small"), demand={"small2": NOW - 1})) == [
        ("start", "small2", "")]


def test_a_loaded_model_starts_beside_an_asleep_one():
    actions = plan_for(gpu("b-1", "big", SLEEPING), demand={"mid": NOW - 1})
    assert summary(actions) == [("start", "mid", "")]


def test_an_asleep_small_model_wakes_beside_a_loaded_big_one():
    actions = plan_for(gpu("b-1", "big"), gpu("s-1", "small", SLEEPING, in_state_for=60),
                       demand={"small": NOW - 1})
    assert summary(actions) == [("wake", "small", "s-1")]


# ---------------------------------------------------------------- eviction by value


def test_a_busy_model_is_not_evicted_for_a_rarely_called_one_that_just_asked():
    """big takes 3 calls/s; mid's one caller has waited 10 s: out ~104 s, big's callers would
    wait ~16,000 call-s. mid waits."""
    actions = plan_for(gpu("b-1", "big"), demand={"mid": NOW - 1}, demand_since={"mid": NOW - 10},
                       arrivals={"big": per_second(3.0), "mid": 1})
    assert summary(actions) == []


def test_once_its_callers_have_waited_as_long_as_the_swap_costs_it_is_made():
    actions = plan_for(gpu("b-1", "big"), demand={"mid": NOW - 1},
                       demand_since={"mid": NOW - 20_000},
                       arrivals={"big": per_second(3.0), "mid": 1})
    assert summary(actions) == [("sleep", "big", "b-1")]
    (action,) = actions
    assert action.evicted_for == "mid"
    assert "evicted for mid" in action.reason and "call-s" in action.reason


def test_a_burst_for_a_cold_model_gets_its_room_at_once_from_an_idle_one():
    actions = plan_for(gpu("b-1", "big"), used={"b-1": 60.0}, demand={"mid": NOW - 1},
                       demand_since={"mid": NOW - 5}, arrivals={"mid": per_second(2.0)})
    assert summary(actions) == [("sleep", "big", "b-1")]
    assert actions[0].evicted_for == "mid"


def test_an_engine_going_to_sleep_anyway_makes_room_in_the_same_pass():
    actions = plan_for(gpu("b-1", "big"), used={"b-1": 400.0}, demand={"mid": NOW - 1})
    assert [(a.kind, a.model) for a in actions] == [("sleep", "big"), ("start", "mid")]
    assert actions[0].evicted_for == ""  # its own keep-alive, not an eviction


def test_sleep_is_the_eviction_when_it_frees_enough_and_stop_when_it_cannot_sleep():
    asleep_ok = plan_for(gpu("b-1", "big"), demand={"mid": NOW - 1})
    assert [a.kind for a in asleep_ok] == ["sleep"]
    no_sleep = plan_for(gpu("b-1", "big"), demand={"mid": NOW - 1}, can_sleep=frozenset())
    assert [a.kind for a in no_sleep] == ["stop"]


def test_an_engine_with_calls_in_flight_is_drained_then_put_to_sleep():
    actions = plan_for(gpu("b-1", "big"), demand={"mid": NOW - 1}, inflight={"b-1": 4})
    assert summary(actions) == [("drain", "big", "b-1")]
    assert (actions[0].then, actions[0].evicted_for) == ("sleep", "mid")
    drained = dataclasses.replace(gpu("b-1", "big", DRAINING, in_state_for=3),
                                  meta={"evicted_for": "mid", "then": "sleep"})
    actions = plan_for(drained, demand={"mid": NOW - 1}, inflight={"b-1": 0})
    # Asleep, it keeps only its context: mid starts beside it in the same pass.
    assert [(a.kind, a.model) for a in actions] == [("sleep", "big"), ("start", "mid")]
    assert "drained" in actions[0].reason


def test_the_cheapest_room_goes_an_idle_small_one_before_a_busy_big_one():
    """mid (42 GB) needs room on a GPU holding big (44) and small (24): evicting small alone
    frees too little, so big goes, and the idle small one is left alone."""
    actions = plan_for(gpu("b-1", "big"), gpu("s-1", "small"), used={"s-1": 30.0},
                       demand={"mid": NOW - 1})
    assert summary(actions) == [("sleep", "big", "b-1")]


def test_a_waking_model_whose_memory_is_taken_evicts_by_value_on_its_own_gpu():
    asleep_mid = gpu("m-1", "mid", SLEEPING, in_state_for=600)
    busy = plan_for(gpu("b-1", "big"), asleep_mid, demand={"mid": NOW - 1},
                    demand_since={"mid": NOW - 5}, arrivals={"big": per_second(3.0)})
    assert summary(busy) == []  # a wake is cheap, but big's callers would still wait
    idle = plan_for(gpu("b-1", "big"), asleep_mid, used={"b-1": 100.0},
                    demand={"mid": NOW - 1})
    assert summary(idle) == [("sleep", "big", "b-1")]


def test_the_silence_since_a_models_last_call_makes_it_cheap_to_push_out():
    """300 arrivals in the window (1 call/s), but none for 100 s: its burst is over."""
    values = {"demand": {"mid": NOW - 1}, "demand_since": {"mid": NOW - 200},
              "arrivals": {"big": per_second(1.0)}}
    recent = plan_for(gpu("b-1", "big"), used={"b-1": 100.0}, **values)
    assert summary(recent) == []
    silent = plan_for(gpu("b-1", "big"), used={"b-1": 100.0},
                      history={"big": CallHistory(last_call=NOW - 100)}, **values)
    assert summary(silent) == [("sleep", "big", "b-1")]


def test_batch_work_never_pushes_a_model_with_realtime_traffic_out_of_memory():
    assert summary(plan_for(gpu("b-1", "big"), batch_pending={"mid": 100},
                            arrivals={"big": 3})) == []
    assert summary(plan_for(gpu("b-1", "big"), batch_pending={"mid": 100})) == [
        ("sleep", "big", "b-1")]


def test_a_pre_warm_never_evicts():
    history = {"mid": CallHistory(gaps=(600.0,) * 20, last_call=NOW - 550)}
    asleep_mid = gpu("m-1", "mid", SLEEPING, in_state_for=500)
    assert summary(plan_for(gpu("b-1", "big"), asleep_mid, history=history)) == []


# ---------------------------------------------------------------- keep-alive by history


BURSTS = CallHistory(gaps=tuple(sorted([20.0] * 50 + [float(g) for g in range(40, 201, 20)] * 2)),
                     last_call=NOW - 130)
RARE = CallHistory(gaps=tuple(float(g) for g in range(1200, 2400, 40)), last_call=NOW - 30)


def test_idle_past_the_setting_a_model_whose_calls_come_back_stays_awake():
    assert summary(plan_for(gpu("s-1", "small"), used={"s-1": 130.0})) == [
        ("sleep", "small", "s-1")]  # no history: SLEEP_AFTER_SECONDS
    assert summary(plan_for(gpu("s-1", "small"), used={"s-1": 130.0},
                            history={"small": BURSTS})) == []


def test_a_rarely_called_model_sleeps_soon_after_its_call_and_stays_asleep_long():
    actions = plan_for(gpu("s-1", "small"), used={"s-1": 30.0}, history={"small": RARE})
    assert summary(actions) == [("sleep", "small", "s-1")]
    assert "idle periods" in actions[0].reason
    # Asleep for 20 minutes: past the idle timeout, but its calls come back within 40.
    asleep = gpu("s-1", "small", SLEEPING, in_state_for=1200)
    assert summary(plan_for(asleep, used={"s-1": 1230.0}, history={"small": RARE})) == []
    assert summary(plan_for(asleep, used={"s-1": 1230.0})) == [("stop", "small", "s-1")]


def test_predictable_pauses_wake_the_engine_ahead_of_the_call_and_keep_it_awake_for_it():
    history = {"small": CallHistory(gaps=(600.0,) * 20, last_call=NOW - 550)}
    asleep = gpu("s-1", "small", SLEEPING, in_state_for=500)
    actions = plan_for(asleep, used={"s-1": 550.0}, history=history)
    assert summary(actions) == [("wake", "small", "s-1")]
    assert actions[0].reason.startswith("pre-warm")
    # Woken 20 s ago, no call yet: it waits awake for it, idle or not.
    woken = gpu("s-1", "small", ready_for=20.0)
    assert summary(plan_for(woken, used={"s-1": 550.0}, history=history)) == []
    # Not woken twice in one pause: put to sleep after the pre-warm point, it stays asleep.
    late = gpu("s-1", "small", SLEEPING, in_state_for=5)
    assert summary(plan_for(late, used={"s-1": 550.0}, history=history)) == []
