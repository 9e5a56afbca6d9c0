"""Placement by GPU memory (`runtimes.placement`), the memory flags engines are given
(`runtimes.engines`), and the keep-alive windows from a model's idle history
(`runtimes.keepalive`): pure functions, tested with hand-built cases."""

from __future__ import annotations

import dataclasses

import pytest

from runtimes.catalog import ModelSpec
from runtimes.engines import ENGINES
from runtimes.keepalive import (
    HISTORY_SECONDS,
    MIN_IDLE_PERIODS,
    ArrivalHistory,
    CallHistory,
    keep_alive,
)
from runtimes.placement import (
    ASLEEP_GB,
    OVERHEAD_GB,
    WHOLE_GPU,
    footprint,
    held_memory,
    place,
    place_spec,
)
from runtimes.registry import READY, SLEEPING
from tests.runtimes.test_policy import record

GB80 = 80.0


def sized(model: str = "m", weights: float | None = 16.0, kv: float | None = 6.0,
          engine: str = "vllm", gpus: int = 1, args: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(id=model, engine=engine, gpus=gpus, weights_gb=weights, kv_cache_gb=kv,
                     args=args, fingerprint=f"fp-{model}")


# ---------------------------------------------------------------- footprints and fractions


def test_an_engine_needs_weights_kv_cache_and_overhead_and_is_told_its_share():
    fp = footprint(sized(weights=16.0, kv=6.0), GB80)
    assert fp.fraction == 0.30  # 24 GB of 80, rounded up to the hundredth
    assert fp.awake == pytest.approx(24.0)
    assert fp.asleep == ASLEEP_GB


def test_tensor_parallel_splits_weights_and_kv_cache_over_its_gpus():
    fp = footprint(sized(weights=70.0, kv=30.0, gpus=2), GB80)
    assert fp.awake == pytest.approx(50.0 + OVERHEAD_GB)


def test_without_kv_cache_gb_a_share_of_the_weights_is_assumed():
    # 20 GB of weights, 8 of KV cache, 2 of overhead: 30 of 80, told 0.38 (what it then holds).
    fp = footprint(sized(weights=20.0, kv=None), GB80)
    assert (fp.fraction, fp.awake) == (0.38, pytest.approx(30.4))


@pytest.mark.parametrize(("spec", "memory"), [
    (sized(weights=None), GB80),  # size not known
    (sized(), None),  # GPU memory not known
    (sized(weights=70.0, kv=10.0), GB80),  # does not fit beside anything
])
def test_what_cannot_be_sized_takes_its_gpu_whole_asleep_too(spec, memory):
    fp = footprint(spec, memory)
    assert fp.whole and fp.asleep == WHOLE_GPU and fp.fraction is None


def test_a_share_given_in_engine_args_is_what_the_engine_takes():
    fp = footprint(sized(args=("--gpu-memory-utilization", "0.5")), GB80)
    assert (fp.awake, fp.fraction) == (40.0, None)  # none added: engine_args carry it


@pytest.mark.parametrize(("engine", "flag"), [
    ("vllm", "--gpu-memory-utilization"), ("sglang", "--mem-fraction-static"),
    ("sim", "--gpu-memory-utilization"),
])
def test_each_engine_gets_its_own_memory_flag(engine, flag):
    spec = sized(engine=engine)
    argv = ENGINES[engine].launch(spec, "127.0.0.1", 8000, in_container=True,
                                  memory_fraction=0.3).argv
    assert argv[argv.index(flag) + 1] == "0.30"
    assert flag not in ENGINES[engine].launch(spec, "127.0.0.1", 8000, in_container=True).argv
    given = dataclasses.replace(spec, args=(f"{flag}=0.8",))
    argv = ENGINES[engine].launch(given, "127.0.0.1", 8000, in_container=True,
                                  memory_fraction=0.3).argv
    assert [a for a in argv if a.startswith(flag)] == [f"{flag}=0.8"]  # the operator's wins


# ---------------------------------------------------------------- placing


def on(instance_id: str, model: str, gpus=(0,), state: str = READY, host: str = "h"):
    return dataclasses.replace(record(instance_id, model, state), gpus=tuple(gpus),
                               gpu_host=host)


CATALOG = {s.id: s for s in (sized("small", 16, 6), sized("small2", 16, 6), sized("big", 28, 14),
                             sized("code", 29.5, 10), sized("unsized", None, None))}
INVENTORY, MEMORY = {"h": (0, 1)}, {"h": GB80}


def spot(model: str, *records):
    held = held_memory(records, CATALOG, MEMORY)
    return place_spec(CATALOG[model], INVENTORY, MEMORY, held)


def test_two_small_models_share_a_gpu_and_pack_onto_the_fuller_one():
    assert spot("small2", on("s", "small", gpus=(1,))) == ("h", (1,))


def test_what_does_not_fit_beside_goes_to_the_other_gpu_or_nowhere():
    assert spot("code", on("b", "big", gpus=(0,))) == ("h", (1,))
    assert spot("code", on("b", "big", gpus=(0,)), on("s", "small", gpus=(1,))) == ("h", (1,))
    assert spot("code", on("b", "big", gpus=(0,)), on("c", "code", gpus=(1,))) is None


def test_an_asleep_engine_keeps_only_its_context_so_a_loaded_one_fits_beside_it():
    asleep = on("b", "big", gpus=(0,), state=SLEEPING)
    assert held_memory([asleep], CATALOG, MEMORY) == {"h": {0: ASLEEP_GB}}
    assert spot("code", asleep, on("x", "big", gpus=(1,))) == ("h", (0,))


def test_a_wake_under_way_holds_its_memory_again():
    waking = dataclasses.replace(on("b", "big", state=SLEEPING), meta={"waking": 1.0})
    assert held_memory([waking], CATALOG, MEMORY) == {"h": {0: pytest.approx(44.0)}}


def test_a_gpu_taken_whole_or_wanted_whole_is_shared_with_nothing():
    assert spot("small", on("u", "unsized", gpus=(0,)), on("x", "unsized", gpus=(1,))) is None
    # An unsized model needs an empty GPU: even an asleep context is in its way.
    assert spot("unsized", on("s", "small", gpus=(0,), state=SLEEPING),
                on("t", "small", gpus=(1,), state=SLEEPING)) is None


def test_without_memory_figures_placement_is_one_engine_per_gpu_as_before():
    held = held_memory([on("s", "small", gpus=(0,))], CATALOG, {})
    assert place(1, {}, INVENTORY, {}, held) == ("h", (1,))
    held = held_memory([on("s", "small", gpus=(0,)), on("t", "small", gpus=(1,))], CATALOG, {})
    assert place(1, {}, INVENTORY, {}, held) is None


# ---------------------------------------------------------------- keep-alive by history

DEFAULTS = {"default_awake": 120.0, "default_stop": 600.0}


def test_too_short_a_history_leaves_the_settings():
    keep = keep_alive(CallHistory(gaps=(20.0,) * (MIN_IDLE_PERIODS - 1)), **DEFAULTS)
    assert (keep.awake, keep.stop, keep.prewarm) == (120.0, 600.0, None)


def test_calls_minutes_apart_keep_it_awake_past_the_setting():
    """Pauses of 40 to 200 s between bursts: idle 120 s, its next call is still likely to come
    within 120 s more, so it stays awake past SLEEP_AFTER_SECONDS (until too few pauses were
    ever that long to say)."""
    gaps = tuple(sorted([20.0] * 50 + [float(g) for g in range(40, 201, 20)] * 2))
    keep = keep_alive(CallHistory(gaps=gaps), **DEFAULTS)
    assert keep.awake == 160.0


def test_after_short_gaps_a_pause_longer_than_the_horizon_is_slept_through_and_pre_warmed():
    gaps = tuple(sorted([20.0] * 50 + [150.0, 160.0, 170.0, 180.0, 190.0, 200.0] * 2))
    keep = keep_alive(CallHistory(gaps=gaps), **DEFAULTS)
    assert keep.awake == 20.0
    assert keep.prewarm == pytest.approx(135.0)  # 90 % of the pauses' 5th percentile
    assert keep.warm_until == pytest.approx(220.0)  # 110 % of their 99th


def test_a_model_called_at_random_every_half_hour_sleeps_at_once():
    keep = keep_alive(CallHistory(gaps=tuple(float(g) for g in range(1200, 2400, 40))),
                      **DEFAULTS)
    assert keep.awake == 10.0
    assert keep.stop >= 2400.0  # asleep it costs its context only: kept for the tail


def test_predictable_pauses_set_a_pre_warm_before_the_next_call():
    keep = keep_alive(CallHistory(gaps=(600.0,) * 20), **DEFAULTS)
    assert keep.prewarm == pytest.approx(540.0)
    assert keep.warm_until == pytest.approx(660.0)


def test_the_catalog_figures_win_over_the_history():
    keep = keep_alive(CallHistory(gaps=(600.0,) * 20), **DEFAULTS, fixed_awake=5.0,
                      fixed_stop=30.0)
    assert (keep.awake, keep.stop) == (5.0, 30.0)


def test_idle_periods_come_from_the_arrival_buckets_at_their_longest():
    history = ArrivalHistory(bucket_seconds=10.0)
    history.add_calls("m", [1.0, 3.0, 12.0, 95.0])  # buckets 0, 0, 1, 9
    assert history.of("m") == CallHistory(gaps=(20.0, 90.0), last_call=100.0)
    history.add("m", 5)  # a bucket read late slots in between
    assert history.of("m").gaps == (20.0, 50.0, 50.0)
    history.prune(now=HISTORY_SECONDS + 55.0)  # buckets before 5 are gone
    assert history.of("m").gaps == (50.0,)
