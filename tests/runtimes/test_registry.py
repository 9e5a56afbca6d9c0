"""`RuntimeRegistry` against a real Redis (the `redis_db` fixture: a clean db 1 of a private
redis-server): records and their compare-and-set transitions, start timings, use reports from web
workers, arrivals, failed starts, start-request dedupe and the decisions log."""

from __future__ import annotations

import threading
import time

import pytest

from runtimes.registry import (
    ARRIVAL_BUCKET_SECONDS,
    DRAINING,
    FAILED,
    READY,
    STARTING,
    WORKER_STALE_SECONDS,
    RuntimeRecord,
    RuntimeRegistry,
)


@pytest.fixture
def registry(redis_db) -> RuntimeRegistry:
    return RuntimeRegistry(redis_db, prefix="test")


def make_record(instance_id: str = "rt-1", model: str = "m", state: str = STARTING, **values):
    return RuntimeRecord(
        id=instance_id, model=model, engine="sim", backend="process", state=state,
        host="127.0.0.1", port=41000, created_at=1000.0, state_since=1000.0, **values,
    )


# ---------------------------------------------------------------- records


def test_create_is_set_if_absent(registry: RuntimeRegistry):
    first = make_record(gpus=(0, 1), meta={"k": "v"})
    assert registry.create(first) is True
    assert registry.get("rt-1") == first  # round-trips through JSON, tuple of gpus included

    assert registry.create(make_record(model="other", state=READY)) is False
    assert registry.get("rt-1") == first
    assert registry.all() == [first]
    assert registry.for_model("m") == [first]
    assert registry.for_model("other") == []
    assert registry.get("rt-missing") is None


def test_transition_changes_a_record_in_an_expected_state(registry: RuntimeRegistry):
    registry.create(make_record())
    before = time.time()
    ready = registry.transition("rt-1", (STARTING,), state=READY, ready_at=1234.0, port=42000)
    assert ready is not None
    assert (ready.state, ready.ready_at, ready.port) == (READY, 1234.0, 42000)
    assert ready.state_since >= before  # a state change stamps state_since
    assert registry.get("rt-1") == ready

    # Changes without a state keep state_since.
    noted = registry.transition("rt-1", None, reason="note")
    assert noted is not None and noted.state_since == ready.state_since
    assert registry.get("rt-1").reason == "note"


@pytest.mark.parametrize("from_states", [(STARTING,), (DRAINING, FAILED)])
def test_transition_from_the_wrong_state_changes_nothing(registry, from_states):
    registry.create(make_record(state=READY))
    stored = registry.redis.hget("test:runtimes", "rt-1")
    assert registry.transition("rt-1", from_states, state=FAILED, reason="nope") is None
    assert registry.redis.hget("test:runtimes", "rt-1") == stored  # byte for byte


def test_transition_of_a_missing_record_returns_none(registry: RuntimeRegistry):
    assert registry.transition("rt-nope", None, state=READY) is None
    assert registry.all() == []


def test_concurrent_transitions_exactly_one_wins(registry: RuntimeRegistry):
    registry.create(make_record())
    threads = 10
    barrier = threading.Barrier(threads)
    results: list[RuntimeRecord | None] = [None] * threads
    errors: list[BaseException] = []

    def attempt(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = registry.transition(
                "rt-1", (STARTING,), state=READY, reason=f"thread {index}"
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=attempt, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=20)
    assert errors == []
    winners = [(i, r) for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1, winners
    index, winner = winners[0]
    assert winner.reason == f"thread {index}"
    assert registry.get("rt-1") == winner


def test_remove_cleans_use_and_inflight(registry: RuntimeRegistry):
    registry.create(make_record("rt-1"))
    registry.create(make_record("rt-2"))
    now = 5000.0
    registry.report_usage("w1", {"rt-1": now, "rt-2": now}, {"rt-1": 2, "rt-2": 1}, {}, now=now)
    assert registry.inflight(["rt-1", "rt-2"], now=now) == {"rt-1": 2, "rt-2": 1}

    registry.remove("rt-1")
    assert registry.get("rt-1") is None
    assert "rt-1" not in registry.last_used()
    assert registry.redis.exists("test:inflight:rt-1") == 0
    assert registry.inflight(["rt-1", "rt-2"], now=now) == {"rt-1": 0, "rt-2": 1}
    # The other instance is untouched.
    assert registry.get("rt-2") is not None
    assert registry.last_used() == {"rt-2": now}


# ---------------------------------------------------------------- start timings


def test_start_durations_keep_the_last_ten_and_their_median(registry: RuntimeRegistry):
    assert registry.start_durations("m") == []
    assert registry.median_start_seconds("m") is None
    for seconds in range(1, 13):  # 1 .. 12
        registry.record_start_duration("m", float(seconds))
    assert registry.start_durations("m") == [float(s) for s in range(12, 2, -1)]  # newest first
    assert registry.median_start_seconds("m") == pytest.approx(7.5)  # median of 3 .. 12

    registry.record_start_duration("m", 0.25, kind="wake")
    assert registry.start_durations("m", kind="wake") == [0.25]
    assert registry.median_start_seconds("other") is None
    assert len(registry.start_durations("m")) == 10


# ---------------------------------------------------------------- use reports


def test_report_usage_and_inflight_count_only_fresh_workers(registry: RuntimeRegistry):
    t0 = 10_000.0
    registry.report_usage("web-a", {"rt-1": t0 - 1}, {"rt-1": 2}, {}, now=t0)
    registry.report_usage("web-b", {"rt-1": t0 + 3}, {"rt-1": 3, "rt-2": 1}, {}, now=t0 + 4)
    assert registry.last_used() == {"rt-1": pytest.approx(t0 + 3)}

    ids = ["rt-1", "rt-2", "rt-3"]
    assert registry.inflight(ids, now=t0 + 5) == {"rt-1": 5, "rt-2": 1, "rt-3": 0}
    # web-a's last report is now WORKER_STALE_SECONDS old: its calls no longer count.
    assert registry.inflight(ids, now=t0 + WORKER_STALE_SECONDS) == {
        "rt-1": 3, "rt-2": 1, "rt-3": 0,
    }
    assert registry.inflight(ids, now=t0 + 4 + WORKER_STALE_SECONDS + 1) == {
        "rt-1": 0, "rt-2": 0, "rt-3": 0,
    }

    # A fresh report from web-a revives its counts; a count back to 0 drops out.
    registry.report_usage("web-a", {}, {"rt-1": 0}, {}, now=t0 + 20)
    registry.report_usage("web-b", {}, {"rt-1": 1}, {}, now=t0 + 20)
    assert registry.inflight(["rt-1"], now=t0 + 21) == {"rt-1": 1}


def test_arrivals_over_a_window(registry: RuntimeRegistry):
    bucket = ARRIVAL_BUCKET_SECONDS
    t0 = 1_000_000.0  # the start of a bucket
    registry.report_usage("w", {}, {}, {"a": 2}, now=t0 + 1)
    registry.report_usage("w2", {}, {}, {"a": 1, "b": 4}, now=t0 + 2)  # same bucket, summed
    registry.report_usage("w", {}, {}, {"a": 3}, now=t0 + 5 * bucket + 5)
    registry.report_usage("w", {}, {}, {"b": 1}, now=t0 + 5 * bucket + 9)
    now = t0 + 5 * bucket + 9

    assert registry.arrivals(60, now=now) == {"a": 6, "b": 5}
    assert registry.arrivals(3 * bucket, now=now) == {"a": 3, "b": 1}
    assert registry.arrivals(60, now=now + 10 * bucket) == {}
    assert registry.arrivals(60, now=t0 - 100) == {}


# ---------------------------------------------------------------- demand, failures, dedupe


def test_demand_is_noted_and_cleared(registry: RuntimeRegistry):
    registry.note_demand("m", now=123.5)
    registry.note_demand("n", now=200.0)
    assert registry.demand() == {"m": 123.5, "n": 200.0}
    registry.clear_demand("m")
    assert registry.demand() == {"n": 200.0}


def test_failed_starts_count_and_reset(registry: RuntimeRegistry):
    assert registry.failed_starts() == {}
    assert registry.note_failed_start("m", {"exit_code": 2, "at": 1.0}) == 1
    assert registry.note_failed_start("m", {"exit_code": 3, "at": 2.0}) == 2
    assert registry.note_failed_start("other", {"at": 3.0}) == 1
    assert registry.failed_starts() == {"m": 2, "other": 1}
    assert registry.last_failure("m") == {"exit_code": 3, "at": 2.0}

    registry.note_good_start("m")
    assert registry.failed_starts() == {"other": 1}
    assert registry.note_failed_start("m", {"at": 4.0}) == 1  # counting starts again

    registry.reset_model("m")
    assert registry.failed_starts() == {"other": 1}
    assert registry.last_failure("m") is None
    assert registry.last_failure("other") == {"at": 3.0}


def test_claim_start_request_once_until_released(registry: RuntimeRegistry):
    assert registry.claim_start_request("m", ttl=30) is True
    assert registry.claim_start_request("m", ttl=30) is False
    assert registry.claim_start_request("m", ttl=30) is False
    assert registry.claim_start_request("other", ttl=30) is True  # per model
    assert 0 < registry.redis.ttl("test:ensure:m") <= 30

    registry.release_start_request("m")
    assert registry.claim_start_request("m", ttl=30) is True
    assert registry.claim_start_request("m", ttl=30) is False


def test_claim_start_request_expires_after_its_ttl(registry: RuntimeRegistry):
    assert registry.claim_start_request("m", ttl=0.2) is True  # rounded up to 1 s
    assert 0 < registry.redis.pttl("test:ensure:m") <= 1000
    deadline = time.monotonic() + 3
    while not registry.claim_start_request("m", ttl=30):
        assert time.monotonic() < deadline, "the claim never expired"
        time.sleep(0.05)


def test_decisions_newest_first_and_trimmed(registry: RuntimeRegistry):
    registry.record_decisions([])
    assert registry.recent_decisions() == []

    registry.record_decisions([{"n": 0}, {"n": 1}])
    registry.record_decisions([{"n": 2}])
    assert registry.recent_decisions() == [{"n": 2}, {"n": 1}, {"n": 0}]
    assert registry.recent_decisions(count=2) == [{"n": 2}, {"n": 1}]

    registry.record_decisions([{"n": i} for i in range(3, 510)])
    kept = registry.recent_decisions(count=1000)
    assert len(kept) == 500
    assert kept[0] == {"n": 509}
    assert kept[-1] == {"n": 10}
    assert [d["n"] for d in kept] == list(range(509, 9, -1))


def test_leases_of_a_killed_holder_are_given_back_within_seconds(redis_server, redis_db):
    """A process holding leases dies with SIGKILL: its heartbeat lapses, and its slots free up."""
    import subprocess
    import sys
    import time

    from runtimes.leases import HEARTBEAT_SECONDS, LeaseSet

    holder = subprocess.Popen([sys.executable, "-c", f"""
import time, redis
from runtimes.leases import LeaseSet
leases = LeaseSet(redis.Redis.from_url("{redis_server.url}/1"), "test:leases")
assert all(leases.acquire("model", 3) for _ in range(3))
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        leases = LeaseSet(redis_db, "test:leases")
        assert leases.acquire("model", 3) is None  # all three slots are taken by a live holder
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + HEARTBEAT_SECONDS * 3 + 5
        lease = None
        while lease is None and time.monotonic() < deadline:
            lease = leases.acquire("model", 3)
            time.sleep(0.2)
        assert lease is not None
        assert leases.held("model") == 1
    finally:
        holder.kill()
