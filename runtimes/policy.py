"""The autoscaling policy: a pure function from a snapshot of the world to a list of actions.

`plan(snapshot)` does no I/O, so it is tested with tables and replayed on traces. Every action
carries a one-line reason, shown on the dashboard and in the decisions API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtimes.backends.base import Observed
from runtimes.catalog import ModelSpec
from runtimes.registry import DRAINING, FAILED, READY, SLEEPING, STARTING, RuntimeRecord

# A model whose starts failed this many times in a row is left alone until an operator resets it.
MAX_FAILED_STARTS = 3
# Unmet demand older than this no longer asks for a start.
DEMAND_WINDOW_SECONDS = 60.0
# A starting record the backend does not show yet may be mid-launch; give it this long.
LAUNCH_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Action:
    kind: str  # start | drain | stop | mark_failed | adopt | forget
    reason: str
    model: str = ""
    instance_id: str = ""
    exit_code: int | None = None
    observed: Observed | None = None

    def describe(self) -> dict:
        return {
            "action": self.kind,
            "model": self.model,
            "instance": self.instance_id,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Snapshot:
    now: float
    catalog: dict[str, ModelSpec]
    runtimes: list[RuntimeRecord]
    observed: list[Observed]
    demand: dict[str, float] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    failed_starts: dict[str, int] = field(default_factory=dict)
    last_failure_at: dict[str, float] = field(default_factory=dict)
    default_idle_timeout: float = 600.0
    drain_timeout: float = 600.0
    restart_backoff_base: float = 5.0


def restart_backoff(failed_starts: int, base: float = 5.0) -> float:
    """Seconds to wait after the n-th failed start in a row before trying again."""
    return min(300.0, base * 2 ** max(0, failed_starts - 1))


def plan(snapshot: Snapshot) -> list[Action]:
    actions: list[Action] = []
    now = snapshot.now
    records = {r.id: r for r in snapshot.runtimes}
    observed = {o.instance_id: o for o in snapshot.observed}

    # 1. Reconcile the registry with what the backend actually runs.
    for inst in snapshot.observed:
        if inst.instance_id in records:
            continue
        spec = snapshot.catalog.get(inst.model)
        if inst.running and spec is not None and inst.fingerprint == spec.fingerprint:
            actions.append(Action("adopt", "running from an earlier start", inst.model,
                                  inst.instance_id, observed=inst))
        else:
            why = "not in the catalog" if spec is None else "catalog entry changed"
            if not inst.running:
                why = "exited and not in the registry"
            actions.append(Action("stop", f"stray instance: {why}", inst.model, inst.instance_id))

    live: dict[str, list[RuntimeRecord]] = {}
    for record in snapshot.runtimes:
        inst = observed.get(record.id)
        if record.state == FAILED:
            actions.append(Action("forget", "failure recorded", record.model, record.id))
            continue
        if inst is None:
            if record.state == STARTING and now - record.created_at < LAUNCH_GRACE_SECONDS:
                live.setdefault(record.model, []).append(record)
            else:
                actions.append(Action("forget", "no longer run by the backend", record.model,
                                      record.id))
            continue
        if not inst.running:
            code = inst.exit_code
            actions.append(Action("mark_failed", f"engine exited with code {code}", record.model,
                                  record.id, exit_code=code))
            continue
        spec = snapshot.catalog.get(record.model)
        if spec is None or spec.fingerprint != record.fingerprint:
            actions.append(Action("stop", "catalog entry removed or changed", record.model,
                                  record.id))
            continue
        live.setdefault(record.model, []).append(record)

    # 2. Idle instances drain; drained ones stop.
    for model, model_records in live.items():
        spec = snapshot.catalog[model]
        idle_timeout = spec.idle_timeout_seconds or snapshot.default_idle_timeout
        serving = [r for r in model_records if r.state in (READY, SLEEPING)]
        keep = spec.min_replicas
        for record in sorted(serving, key=lambda r: _last_active(snapshot, r)):
            inflight = snapshot.inflight.get(record.id, 0)
            idle = now - _last_active(snapshot, record)
            if idle >= idle_timeout and inflight == 0 and len(serving) > keep:
                reason = f"idle for {idle:.0f} s (timeout {idle_timeout:.0f} s)"
                actions.append(Action("drain", reason, model, record.id))
                serving.remove(record)
        for record in model_records:
            if record.state != DRAINING:
                continue
            inflight = snapshot.inflight.get(record.id, 0)
            if inflight == 0:
                actions.append(Action("stop", "drained: no calls in flight", model, record.id))
            elif now - record.state_since > snapshot.drain_timeout:
                actions.append(Action("stop", f"drain timed out with {inflight} calls in flight",
                                      model, record.id))

    # 3. Start what is wanted and not running: unmet demand, or fewer than min replicas.
    draining = {a.instance_id for a in actions if a.kind in ("drain", "stop")}
    for model, spec in snapshot.catalog.items():
        running = [r for r in live.get(model, []) if r.state != DRAINING and r.id not in draining]
        failures = snapshot.failed_starts.get(model, 0)
        if failures >= MAX_FAILED_STARTS:
            continue
        since_failure = now - snapshot.last_failure_at.get(model, 0.0)
        if failures and since_failure < restart_backoff(failures, snapshot.restart_backoff_base):
            continue
        wanted_at = snapshot.demand.get(model)
        if not running and wanted_at is not None and now - wanted_at < DEMAND_WINDOW_SECONDS:
            actions.append(Action("start", "realtime call waiting for a cold model", model))
        elif len(running) < spec.min_replicas:
            actions.append(Action("start", f"below min_replicas={spec.min_replicas}", model))
    return actions


def _last_active(snapshot: Snapshot, record: RuntimeRecord) -> float:
    return max(snapshot.last_used.get(record.id, 0.0), record.ready_at or record.state_since)
