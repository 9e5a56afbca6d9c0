"""Table tests of the autoscaling policy: `plan(Snapshot)` is a pure function, so every case is a
hand-built snapshot (catalog, registry records, what the backend observes, use and failures) and
the exact list of actions it must produce."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from runtimes.backends.base import Observed
from runtimes.catalog import ModelSpec
from runtimes.policy import (
    DEMAND_WINDOW_SECONDS,
    LAUNCH_GRACE_SECONDS,
    MAX_FAILED_STARTS,
    Action,
    Snapshot,
    plan,
    restart_backoff,
)
from runtimes.registry import DRAINING, FAILED, READY, SLEEPING, STARTING, RuntimeRecord

NOW = 1_000_000.0
IDLE = 300.0  # idle timeout of model "m"
DRAIN_TIMEOUT = 600.0


def spec(model: str = "m", **changes) -> ModelSpec:
    values = {"idle_timeout_seconds": IDLE, "fingerprint": f"fp-{model}", **changes}
    return ModelSpec(id=model, engine="sim", gpus=0, **values)


def record(
    instance_id: str,
    model: str = "m",
    state: str = READY,
    *,
    age: float = 10_000.0,
    in_state_for: float | None = None,
    ready_for: float | None = None,
    fingerprint: str | None = None,
) -> RuntimeRecord:
    """A record created `age` s ago, in `state` for `in_state_for` s (default: since creation)."""
    since = NOW - (age if in_state_for is None else in_state_for)
    ready_at = None
    if state in (READY, SLEEPING, DRAINING):
        ready_at = NOW - (ready_for if ready_for is not None else age - 1.0)
    return RuntimeRecord(
        id=instance_id,
        model=model,
        engine="sim",
        backend="process",
        state=state,
        host="127.0.0.1",
        port=40000,
        handle=instance_id,
        fingerprint=f"fp-{model}" if fingerprint is None else fingerprint,
        created_at=NOW - age,
        state_since=since,
        ready_at=ready_at,
    )


def seen(
    instance_id: str,
    model: str = "m",
    *,
    running: bool = True,
    exit_code: int | None = None,
    fingerprint: str | None = None,
) -> Observed:
    return Observed(
        instance_id=instance_id,
        model=model,
        engine="sim",
        handle=instance_id,
        host="127.0.0.1",
        port=40000,
        running=running,
        exit_code=exit_code,
        fingerprint=f"fp-{model}" if fingerprint is None else fingerprint,
    )


def live(*records: RuntimeRecord) -> dict:
    """Records plus a running observed instance for each: the backend agrees with the registry."""
    return {"runtimes": list(records), "observed": [seen(r.id, r.model) for r in records]}


def snapshot(catalog: tuple[ModelSpec, ...] = (), **values) -> Snapshot:
    values.setdefault("runtimes", [])
    values.setdefault("observed", [])
    return Snapshot(
        now=NOW,
        catalog={s.id: s for s in (catalog or (spec(),))},
        drain_timeout=DRAIN_TIMEOUT,
        **values,
    )


def summary(actions: list[Action]) -> list[tuple[str, str, str]]:
    return sorted((a.kind, a.model, a.instance_id) for a in actions)


def check_reasons(actions: list[Action]) -> None:
    for action in actions:
        assert action.reason.strip(), f"{action} has no reason"
        assert action.describe()["reason"] == action.reason


@dataclass
class Case:
    name: str
    snapshot: Snapshot
    expected: list[tuple[str, str, str]]
    reason_contains: dict[str, str] = field(default_factory=dict)  # kind -> text in its reason


def run_cases(cases: list[Case]):
    return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])


def check(case: Case) -> list[Action]:
    actions = plan(case.snapshot)
    assert summary(actions) == sorted(case.expected), [a.describe() for a in actions]
    check_reasons(actions)
    for kind, text in case.reason_contains.items():
        reasons = [a.reason for a in actions if a.kind == kind]
        assert reasons and all(text in r for r in reasons), (kind, text, reasons)
    return actions


# ---------------------------------------------------------------- reconciling with the backend

RECONCILE = [
    Case("adopt running instance unknown to the registry",
         snapshot(observed=[seen("i1")]),
         [("adopt", "m", "i1")]),
    Case("stray: model not in the catalog",
         snapshot(observed=[seen("i1", "gone/model")]),
         [("stop", "gone/model", "i1")], {"stop": "not in the catalog"}),
    Case("stray: fingerprint differs from the catalog entry",
         snapshot(observed=[seen("i1", fingerprint="fp-old")]),
         [("stop", "m", "i1")], {"stop": "catalog entry changed"}),
    Case("stray: exited and not in the registry",
         snapshot(observed=[seen("i1", running=False, exit_code=1)]),
         [("stop", "m", "i1")], {"stop": "exited"}),
    Case("forget a ready record the backend does not run",
         snapshot(runtimes=[record("i1")]),
         [("forget", "m", "i1")], {"forget": "no longer run by the backend"}),
    Case("fresh starting record not observed yet: launch grace",
         snapshot(runtimes=[record("i1", state=STARTING, age=LAUNCH_GRACE_SECONDS - 5)]),
         []),
    Case("starting record unseen past the launch grace is forgotten",
         snapshot(runtimes=[record("i1", state=STARTING, age=LAUNCH_GRACE_SECONDS + 1)]),
         [("forget", "m", "i1")]),
    Case("failed record is forgotten",
         snapshot(runtimes=[record("i1", state=FAILED)],
                  observed=[seen("i1", running=False, exit_code=2)]),
         [("forget", "m", "i1")]),
    Case("exited instance is marked failed",
         snapshot(runtimes=[record("i1")], observed=[seen("i1", running=False, exit_code=137)]),
         [("mark_failed", "m", "i1")], {"mark_failed": "137"}),
    Case("exited while starting is marked failed",
         snapshot(runtimes=[record("i1", state=STARTING, age=2)],
                  observed=[seen("i1", running=False, exit_code=2)]),
         [("mark_failed", "m", "i1")], {"mark_failed": "code 2"}),
    Case("starting, made but not yet run (no exit code): launch grace, and no second start",
         snapshot(runtimes=[record("i1", state=STARTING, age=1)],
                  observed=[seen("i1", running=False)], demand={"m": NOW - 1}),
         []),
    Case("made but never run past the launch grace is marked failed",
         snapshot(runtimes=[record("i1", state=STARTING, age=LAUNCH_GRACE_SECONDS + 1)],
                  observed=[seen("i1", running=False)]),
         [("mark_failed", "m", "i1")], {"mark_failed": "code None"}),
    Case("registry record whose catalog entry changed is stopped",
         snapshot(**live(record("i1", fingerprint="fp-old"))),
         [("stop", "m", "i1")], {"stop": "catalog entry"}),
    Case("registry record whose model left the catalog is stopped",
         snapshot(catalog=(spec("other"),), **live(record("i1"))),
         [("stop", "m", "i1")]),
    Case("ready and recently used: nothing to do",
         snapshot(**live(record("i1")), last_used={"i1": NOW - 5}),
         []),
]


@run_cases(RECONCILE)
def test_reconcile(case: Case):
    check(case)


def test_adopt_carries_the_observed_instance():
    inst = seen("i1")
    (action,) = plan(snapshot(observed=[inst]))
    assert action.kind == "adopt"
    assert action.observed == inst


def test_mark_failed_carries_the_exit_code():
    actions = plan(snapshot(runtimes=[record("i1")],
                            observed=[seen("i1", running=False, exit_code=137)]))
    assert [(a.kind, a.exit_code) for a in actions] == [("mark_failed", 137)]


# ---------------------------------------------------------------- idle drain and draining


def idle_snapshot(idle: float, inflight: int = 0, min_replicas: int = 0, **values) -> Snapshot:
    return snapshot(
        catalog=(spec(min_replicas=min_replicas, max_replicas=max(1, min_replicas)),),
        **live(record("i1")),
        last_used={"i1": NOW - idle},
        inflight={"i1": inflight},
        **values,
    )


IDLE_CASES = [
    Case("idle exactly the timeout drains", idle_snapshot(IDLE), [("drain", "m", "i1")],
         {"drain": "idle for 300 s"}),
    Case("idle longer than the timeout drains", idle_snapshot(IDLE * 3), [("drain", "m", "i1")]),
    Case("idle just under the timeout stays", idle_snapshot(IDLE - 1), []),
    Case("calls in flight keep an idle instance", idle_snapshot(IDLE * 3, inflight=1), []),
    Case("min_replicas=1 keeps the only instance warm", idle_snapshot(IDLE * 3, min_replicas=1),
         []),
    Case("sleeping instance idle past the timeout stops at once (nothing can be in flight)",
         snapshot(**live(record("i1", state=SLEEPING)), last_used={"i1": NOW - IDLE - 1}),
         [("stop", "m", "i1")], {"stop": "idle for 301 s"}),
    Case("never used: idle counts from ready_at",
         snapshot(**live(record("i1", ready_for=IDLE + 1))), [("drain", "m", "i1")]),
    Case("never used, ready recently: stays",
         snapshot(**live(record("i1", ready_for=IDLE - 10))), []),
    Case("catalog idle timeout overrides a shorter default",
         snapshot(**live(record("i1")), last_used={"i1": NOW - IDLE + 10},
                  default_idle_timeout=60),
         []),
    Case("no catalog idle timeout: a longer default applies",
         snapshot(catalog=(spec(idle_timeout_seconds=None),), **live(record("i1")),
                  last_used={"i1": NOW - IDLE - 1}, default_idle_timeout=IDLE * 10),
         []),
    Case("default idle timeout when the catalog has none",
         snapshot(catalog=(spec(idle_timeout_seconds=None),), **live(record("i1")),
                  last_used={"i1": NOW - 61}, default_idle_timeout=60),
         [("drain", "m", "i1")]),
    Case("starting instance never drains",
         snapshot(**live(record("i1", state=STARTING, age=IDLE * 3))), []),
]


@run_cases(IDLE_CASES)
def test_idle_drain(case: Case):
    check(case)


def test_min_replicas_drains_only_the_surplus_least_recently_used_first():
    snap = snapshot(
        catalog=(spec(min_replicas=1, max_replicas=3),),
        **live(record("old"), record("older"), record("recent")),
        last_used={"old": NOW - IDLE - 10, "older": NOW - IDLE - 100, "recent": NOW - IDLE - 1},
    )
    actions = plan(snap)
    check_reasons(actions)
    # Three idle, one must stay: the two least recently used go.
    assert summary(actions) == [("drain", "m", "old"), ("drain", "m", "older")]


DRAINING_CASES = [
    Case("drained with nothing in flight stops",
         snapshot(**live(record("i1", state=DRAINING, in_state_for=1)), inflight={"i1": 0}),
         [("stop", "m", "i1")], {"stop": "drained"}),
    Case("draining with calls in flight waits",
         snapshot(**live(record("i1", state=DRAINING, in_state_for=10)), inflight={"i1": 2}),
         []),
    Case("draining just inside the drain timeout waits",
         snapshot(**live(record("i1", state=DRAINING, in_state_for=DRAIN_TIMEOUT - 1)),
                  inflight={"i1": 2}),
         []),
    Case("drain timeout stops even with calls in flight",
         snapshot(**live(record("i1", state=DRAINING, in_state_for=DRAIN_TIMEOUT + 1)),
                  inflight={"i1": 2}),
         [("stop", "m", "i1")], {"stop": "timed out with 2 calls in flight"}),
]


@run_cases(DRAINING_CASES)
def test_draining(case: Case):
    check(case)


# ---------------------------------------------------------------- starts


def recent(model: str = "m", ago: float = 1.0) -> dict[str, float]:
    return {model: NOW - ago}


START_CASES = [
    Case("recent demand for a cold model starts it", snapshot(demand=recent()),
         [("start", "m", "")], {"start": "realtime call waiting"}),
    Case("demand just inside the window starts",
         snapshot(demand=recent(ago=DEMAND_WINDOW_SECONDS - 1)), [("start", "m", "")]),
    Case("demand older than the window does nothing",
         snapshot(demand=recent(ago=DEMAND_WINDOW_SECONDS + 1)), []),
    Case("demand for a model not in the catalog does nothing",
         snapshot(demand=recent("unknown")), []),
    Case("no start while a ready instance exists",
         snapshot(**live(record("i1")), last_used={"i1": NOW - 1}, demand=recent()), []),
    Case("no start while an instance is starting",
         snapshot(**live(record("i1", state=STARTING, age=5)), demand=recent()), []),
    Case("no start while a launch is within its grace (not observed yet)",
         snapshot(runtimes=[record("i1", state=STARTING, age=2)], demand=recent()), []),
    Case("a draining instance does not count as running",
         snapshot(**live(record("i1", state=DRAINING, in_state_for=1)), inflight={"i1": 1},
                  demand=recent()),
         [("start", "m", "")]),
    Case("below min_replicas starts one",
         snapshot(catalog=(spec(min_replicas=1),)),
         [("start", "m", "")], {"start": "below min_replicas=1"}),
    Case("below min_replicas=2 with one ready starts one more",
         snapshot(catalog=(spec(min_replicas=2, max_replicas=2),), **live(record("i1")),
                  last_used={"i1": NOW - 1}),
         [("start", "m", "")]),
    Case("min_replicas met: no start",
         snapshot(catalog=(spec(min_replicas=1),), **live(record("i1")),
                  last_used={"i1": NOW - 1}),
         []),
    Case("only the wanted model starts",
         snapshot(catalog=(spec("a"), spec("b")), demand=recent("b")), [("start", "b", "")]),
]


@run_cases(START_CASES)
def test_start(case: Case):
    check(case)


@pytest.mark.parametrize(
    ("failures", "base", "expected"),
    [(0, 5.0, 5.0), (1, 5.0, 5.0), (2, 5.0, 10.0), (3, 5.0, 20.0), (5, 5.0, 80.0),
     (7, 5.0, 300.0), (50, 5.0, 300.0), (1, 0.2, 0.2), (3, 0.2, 0.8)],
)
def test_restart_backoff(failures: int, base: float, expected: float):
    assert restart_backoff(failures, base) == pytest.approx(expected)


def failed(count: int, ago: float, base: float = 5.0, **values) -> Snapshot:
    values.setdefault("demand", recent())
    return snapshot(failed_starts={"m": count}, last_failure_at={"m": NOW - ago},
                    restart_backoff_base=base, **values)


BACKOFF_CASES = [
    Case("1 failure, inside its 5 s backoff: no start", failed(1, 4.0), []),
    Case("1 failure, after its 5 s backoff: start", failed(1, 6.0), [("start", "m", "")]),
    Case("2 failures, inside the 10 s backoff: no start", failed(2, 9.0), []),
    Case("2 failures, after the 10 s backoff: start", failed(2, 11.0), [("start", "m", "")]),
    Case("backoff base from the snapshot", failed(1, 0.3, base=0.2), [("start", "m", "")]),
    Case("backoff also holds min_replicas back",
         failed(1, 1.0, catalog=(spec(min_replicas=1),), demand={}), []),
    Case("MAX_FAILED_STARTS: never again, however old the failure",
         failed(MAX_FAILED_STARTS, 1e6), []),
    Case("MAX_FAILED_STARTS: not even for min_replicas",
         failed(MAX_FAILED_STARTS, 1e6, catalog=(spec(min_replicas=1),)), []),
    Case("failures of another model do not hold this one back",
         snapshot(catalog=(spec("a"), spec("b")), demand=recent("b"),
                  failed_starts={"a": MAX_FAILED_STARTS}, last_failure_at={"a": NOW}),
         [("start", "b", "")]),
]


@run_cases(BACKOFF_CASES)
def test_restart_backoff_and_failed_starts(case: Case):
    check(case)


def test_every_action_has_a_reason_in_a_busy_snapshot():
    snap = snapshot(
        catalog=(spec("m"), spec("w", min_replicas=1), spec("cold")),
        runtimes=[
            record("ready-idle"),
            record("draining", state=DRAINING, in_state_for=1),
            record("crashed"),
            record("lost"),
            record("failed", state=FAILED),
        ],
        observed=[
            seen("ready-idle"), seen("draining"), seen("crashed", running=False, exit_code=3),
            seen("orphan", "cold"), seen("stray", "nope"),
        ],
        last_used={"ready-idle": NOW - IDLE * 2},
    )
    actions = plan(snap)
    assert summary(actions) == sorted([
        ("adopt", "cold", "orphan"),
        ("stop", "nope", "stray"),
        ("mark_failed", "m", "crashed"),
        ("forget", "m", "lost"),
        ("forget", "m", "failed"),
        ("drain", "m", "ready-idle"),
        ("stop", "m", "draining"),
        ("start", "w", ""),
    ])
    check_reasons(actions)


def test_no_start_while_a_running_instance_is_being_adopted():
    """A running engine the registry lost (Redis flushed) is adopted; a call waiting for that
    model must not also ask for a second engine in the same plan."""
    snap = snapshot(observed=[seen("i1")], demand=recent())
    kinds = [a.kind for a in plan(snap)]
    assert "adopt" in kinds
    assert "start" not in kinds, (
        "plan() must count an instance it adopts as live for its model; recent demand also "
        f"emitted a 'start' decision: {kinds}"
    )
