"""The autoscaling policy: a pure function from a snapshot of the world to a list of actions.

`plan(snapshot)` does no I/O, so it is tested with tables and replayed on traces
(`bench/simulate.py`). Every action carries a one-line reason, shown on the dashboard and in the
decisions API. In order, it:

1. reconciles the registry with what the backend runs (adopt, forget, mark failed, stop strays);
2. lets idle engines sleep (where the engine can), then drain and stop after their idle timeout;
3. finds what is wanted: a realtime call waiting for a cold model, batch lines waiting for one,
   fewer instances than `min_replicas`, or a busy model (engine queue above a threshold) that may
   scale out up to `max_replicas`;
4. places each wanted start on free GPUs, realtime first; when none are free it evicts the least
   valuable runtime: asleep before idle before busy, never one with calls in flight (that one is
   drained first), and never a runtime with realtime traffic for batch work.

Hysteresis: a model scales out only when none of its instances is starting, scales in only after
a whole idle timeout, and batch work never evicts an instance younger than `min_lifetime`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtimes.backends.base import Observed
from runtimes.catalog import ModelSpec
from runtimes.engines import EngineLoad, engine_for
from runtimes.placement import Inventory, place, used_gpus, with_reservations
from runtimes.registry import DRAINING, FAILED, READY, SLEEPING, STARTING, RuntimeRecord

# A model whose starts failed this many times in a row is left alone until an operator resets it.
MAX_FAILED_STARTS = 3
# Unmet demand older than this no longer asks for a start. The control plane clears a model's
# demand once it is ready, so this only ends the wish of callers who gave up; it must outlast
# the longest Retry-After, or a caller told to come back in 3 minutes is forgotten meanwhile.
DEMAND_WINDOW_SECONDS = 600.0
# A starting record the backend does not show yet may be mid-launch; give it this long.
LAUNCH_GRACE_SECONDS = 30.0

# Why a start is wanted, most urgent first.
REALTIME, MIN_REPLICAS, SCALE_OUT, BATCH = "realtime", "min_replicas", "scale_out", "batch"
_URGENCY = {REALTIME: 0, MIN_REPLICAS: 1, SCALE_OUT: 2, BATCH: 3}


@dataclass(frozen=True)
class Action:
    kind: str  # start | wake | sleep | drain | stop | mark_failed | adopt | forget
    reason: str
    model: str = ""
    instance_id: str = ""
    exit_code: int | None = None
    observed: Observed | None = None
    replicas: int = 1  # with start: how many live instances the model should then have
    evicted_for: str = ""  # with drain/stop: the model whose start needs the GPUs

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
    # GPU hosts and their GPU ids; empty: GPUs are not managed (every start fits).
    gpu_inventory: Inventory = field(default_factory=dict)
    # Realtime calls per model over the recent window, and batch lines waiting per model.
    arrivals: dict[str, int] = field(default_factory=dict)
    batch_pending: dict[str, int] = field(default_factory=dict)
    engine_load: dict[str, EngineLoad] = field(default_factory=dict)
    # Models whose engine can sleep (vLLM sleep mode), and after how long idle it should.
    can_sleep: frozenset[str] = frozenset()
    sleep_after_seconds: float | None = None
    scale_out_waiting: float = 8.0
    min_lifetime: float = 60.0
    # GPUs set aside for a model by an eviction made for it: model -> (host, GPU ids).
    reservations: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # Models whose weights are not in the cache yet, and those of them being downloaded: such a
    # model cannot start before its download ends, so nothing is evicted for it until then.
    weights_missing: frozenset[str] = frozenset()
    downloading: frozenset[str] = frozenset()


def restart_backoff(failed_starts: int, base: float = 5.0) -> float:
    """Seconds to wait after the n-th failed start in a row before trying again."""
    return min(300.0, base * 2 ** max(0, failed_starts - 1))


def plan(snapshot: Snapshot) -> list[Action]:
    actions, live = _reconcile(snapshot)
    leaving: set[str] = set()
    actions += _idle_and_drain(snapshot, live, leaving)
    actions += _starts_and_evictions(snapshot, live, leaving)
    return actions


def _reconcile(snapshot: Snapshot) -> tuple[list[Action], dict[str, list[RuntimeRecord]]]:
    actions: list[Action] = []
    now = snapshot.now
    records = {r.id: r for r in snapshot.runtimes}
    observed = {o.instance_id: o for o in snapshot.observed}

    live: dict[str, list[RuntimeRecord]] = {}
    for inst in snapshot.observed:
        if inst.instance_id in records:
            continue
        spec = snapshot.catalog.get(inst.model)
        if inst.running and spec is not None and inst.fingerprint == spec.fingerprint:
            actions.append(Action("adopt", "running from an earlier start", inst.model,
                                  inst.instance_id, observed=inst))
            # It counts as live from now on: no second start, and its GPUs are taken.
            live.setdefault(inst.model, []).append(RuntimeRecord(
                id=inst.instance_id, model=inst.model, engine=inst.engine, backend="",
                state=STARTING, host=inst.host, port=inst.port, gpus=inst.gpus,
                gpu_host=inst.gpu_host, fingerprint=inst.fingerprint,
                created_at=inst.started_at, state_since=now,
            ))
        else:
            why = "not in the catalog" if spec is None else "catalog entry changed"
            if not inst.running:
                why = "exited and not in the registry"
            actions.append(Action("stop", f"stray instance: {why}", inst.model, inst.instance_id))

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
    return actions, live


def _wanted_since(snapshot: Snapshot, wanted_at: float | None, since: float) -> bool:
    """Whether a realtime call asked for the model after `since` (and not too long ago)."""
    return (wanted_at is not None and wanted_at >= since
            and snapshot.now - wanted_at < DEMAND_WINDOW_SECONDS)


def _last_active(snapshot: Snapshot, record: RuntimeRecord) -> float:
    return max(snapshot.last_used.get(record.id, 0.0), record.ready_at or record.state_since)


def _idle_and_drain(snapshot: Snapshot, live: dict[str, list[RuntimeRecord]],
                    leaving: set[str]) -> list[Action]:
    actions: list[Action] = []
    now = snapshot.now
    for model, records in live.items():
        spec = snapshot.catalog[model]
        idle_timeout = spec.idle_timeout_seconds or snapshot.default_idle_timeout
        serving = [r for r in records if r.state in (READY, SLEEPING)]
        # Batch lines waiting for the model mean it is not idle, even if none reached it lately.
        busy_with_batch = snapshot.batch_pending.get(model, 0) > 0
        wanted_at = snapshot.demand.get(model)
        sleep_after = spec.sleep_after_seconds
        if sleep_after is None:
            sleep_after = snapshot.sleep_after_seconds
        for record in sorted(serving, key=lambda r: _last_active(snapshot, r)):
            if busy_with_batch or snapshot.inflight.get(record.id, 0):
                continue
            if record.state == SLEEPING and _wanted_since(snapshot, wanted_at, record.state_since):
                continue  # a caller waits for it: it is woken, not stopped
            idle = now - _last_active(snapshot, record)
            if idle >= idle_timeout and len(serving) > spec.min_replicas:
                reason = f"idle for {idle:.0f} s (timeout {idle_timeout:.0f} s)"
                # Nothing can be in flight on a sleeping engine: it stops at once.
                kind = "stop" if record.state == SLEEPING else "drain"
                actions.append(Action(kind, reason, model, record.id))
                serving.remove(record)
                leaving.add(record.id)
            elif (record.state == READY and model in snapshot.can_sleep
                  and sleep_after is not None and sleep_after <= idle < idle_timeout):
                actions.append(Action("sleep", f"idle for {idle:.0f} s: sleep, wake in ~1 s",
                                      model, record.id))
        for record in records:
            if record.state != DRAINING:
                continue
            leaving.add(record.id)
            inflight = snapshot.inflight.get(record.id, 0)
            if inflight == 0:
                actions.append(Action("stop", "drained: no calls in flight", model, record.id))
            elif now - record.state_since > snapshot.drain_timeout:
                actions.append(Action("stop", f"drain timed out with {inflight} calls in flight",
                                      model, record.id))
    return actions


def _wanted(snapshot: Snapshot, live: dict[str, list[RuntimeRecord]],
            leaving: set[str]) -> tuple[list[tuple[str, str, str, int]], list[Action]]:
    """(kind, model, reason, replicas) of each start wanted, and the wake-ups that serve demand
    instead."""
    wanted: list[tuple[str, str, str, int]] = []
    wakes: list[Action] = []
    now = snapshot.now
    for model, spec in snapshot.catalog.items():
        failures = snapshot.failed_starts.get(model, 0)
        if failures >= MAX_FAILED_STARTS:
            continue
        since_failure = now - snapshot.last_failure_at.get(model, 0.0)
        if failures and since_failure < restart_backoff(failures, snapshot.restart_backoff_base):
            continue
        records = [r for r in live.get(model, []) if r.id not in leaving and r.state != DRAINING]
        ready = [r for r in records if r.state == READY]
        asleep = [r for r in records if r.state == SLEEPING]
        starting = [r for r in records if r.state == STARTING]
        wanted_at = snapshot.demand.get(model)
        realtime_waiting = wanted_at is not None and now - wanted_at < DEMAND_WINDOW_SECONDS
        batch_waiting = snapshot.batch_pending.get(model, 0)
        # A call noted before the engine went to sleep was served before it did: not a reason
        # to wake it (that would flap between sleep and wake).
        woken_by_call = asleep and _wanted_since(snapshot, wanted_at, asleep[0].state_since)
        if (woken_by_call or batch_waiting) and not ready and not starting and asleep:
            why = "realtime call waiting" if woken_by_call else f"{batch_waiting} batch lines"
            wakes.append(Action("wake", f"{why}: wake the sleeping engine", model, asleep[0].id))
            continue
        more = len(records) + 1
        if not records and realtime_waiting:
            wanted.append((REALTIME, model, "realtime call waiting for a cold model", 1))
        elif len(records) < spec.min_replicas:
            wanted.append((MIN_REPLICAS, model, f"below min_replicas={spec.min_replicas}", more))
        elif not records and batch_waiting:
            wanted.append((BATCH, model, f"{batch_waiting} batch lines waiting", 1))
        elif ready and not starting and len(records) < spec.max_replicas:
            waiting = sum(snapshot.engine_load.get(r.id, EngineLoad()).waiting for r in ready)
            if waiting / len(ready) > snapshot.scale_out_waiting:
                wanted.append((SCALE_OUT, model,
                               f"busy: {waiting:.0f} calls queued in {len(ready)} engine(s)",
                               more))
    wanted.sort(key=lambda w: _URGENCY[w[0]])
    return wanted, wakes


def _starts_and_evictions(snapshot: Snapshot, live: dict[str, list[RuntimeRecord]],
                          leaving: set[str]) -> list[Action]:
    wanted, actions = _wanted(snapshot, live, leaving)
    holding = [r for records in live.values() for r in records]
    alive = [r for r in holding if r.id not in leaving]
    # GPUs stay taken until their instance is gone: a draining engine still holds them.
    used = used_gpus(holding)
    # GPUs freed by an eviction go to the model they were freed for, not back to the model
    # evicted (whose callers, refused meanwhile, want it back at once).
    owed = {r.meta.get("evicted_for") for r in holding if r.id in leaving or r.state == DRAINING}
    wanted.sort(key=lambda w: (_URGENCY[w[0]], w[1] not in owed,
                               snapshot.demand.get(w[1], snapshot.now)))
    for kind, model, reason, replicas in wanted:
        if model in snapshot.weights_missing:
            # It cannot start before its weights are here: evict nothing for it yet. A start
            # asks for the download (and claims no GPU), unless one is under way.
            if model not in snapshot.downloading:
                actions.append(Action("start", f"{reason}; its weights are downloaded first",
                                      model, replicas=replicas))
            continue
        needed = snapshot.catalog[model].gpus
        taken = with_reservations(used, snapshot.reservations, model)
        spot = place(needed, snapshot.gpu_inventory, taken) if snapshot.gpu_inventory else ("", ())
        if spot is not None:
            host, gpus = spot
            if gpus:
                used.setdefault(host, set()).update(gpus)
            actions.append(Action("start", reason, model, replicas=replicas))
            continue
        victims = _choose_victims(snapshot, kind, model, alive, used)
        for victim in victims:
            inflight = snapshot.inflight.get(victim.id, 0)
            why = f"evicted for {model} ({reason})"
            actions.append(Action("drain" if inflight else "stop",
                                  why + (f"; draining {inflight} calls" if inflight else ""),
                                  victim.model, victim.id, evicted_for=model))
            # Its GPUs stay counted as used until it is gone; the start comes on a later pass.
            alive.remove(victim)
    return actions


def _eviction_rank(snapshot: Snapshot, record: RuntimeRecord) -> tuple:
    """Cheapest to evict first: asleep, then no realtime traffic, no batch work, least recent."""
    return (
        record.state != SLEEPING,
        snapshot.inflight.get(record.id, 0) > 0,
        snapshot.arrivals.get(record.model, 0) > 0,
        snapshot.batch_pending.get(record.model, 0) > 0,
        _last_active(snapshot, record),
    )


def _choose_victims(snapshot: Snapshot, kind: str, model: str, alive: list[RuntimeRecord],
                    used: dict[str, set[int]]) -> list[RuntimeRecord]:
    needed = snapshot.catalog[model].gpus
    counts: dict[str, int] = {}
    for record in alive:
        counts[record.model] = counts.get(record.model, 0) + 1

    def evictable(record: RuntimeRecord) -> bool:
        if record.model == model or record.state not in (READY, SLEEPING) or not record.gpus:
            return False
        if counts[record.model] <= snapshot.catalog[record.model].min_replicas:
            return False
        if record.state == SLEEPING:
            return True
        # No flapping: an engine that has only just arrived stays a while, whoever asks.
        if snapshot.now - (record.ready_at or record.state_since) < snapshot.min_lifetime:
            return False
        if kind == REALTIME:
            return True
        # Batch work, warm-keeping and scale-out never push out realtime traffic.
        return (snapshot.arrivals.get(record.model, 0) == 0
                and snapshot.inflight.get(record.id, 0) == 0)

    best: list[RuntimeRecord] | None = None
    for host in snapshot.gpu_inventory:
        chosen: list[RuntimeRecord] = []
        held = set(used.get(host, set()))
        candidates = sorted((r for r in alive if r.gpu_host == host and evictable(r)),
                            key=lambda r: _eviction_rank(snapshot, r))
        for record in candidates:
            if len(snapshot.gpu_inventory[host]) - len(held) >= needed:
                break
            chosen.append(record)
            held -= set(record.gpus)
        if len(snapshot.gpu_inventory[host]) - len(held) >= needed and chosen:
            if best is None or len(chosen) < len(best):
                best = chosen
    return best or []


# Of an engine's sequences, the share batch may fill by default: the rest is room for realtime
# calls, which then start at once instead of waiting for batch lines to end.
BATCH_SHARE_OF_ENGINE = 0.75


def batch_per_engine(spec: ModelSpec, default: int) -> int:
    """Batch lines one ready engine of `spec` may have in flight: the catalog's
    `batch_max_inflight`; else 3/4 of the engine's concurrency, when the catalog states it
    (`max_concurrency`, or the flag in engine_args); else `default`."""
    if spec.batch_max_inflight:
        return spec.batch_max_inflight
    concurrency = engine_for(spec).concurrency(spec)
    if concurrency:
        return max(1, int(concurrency * BATCH_SHARE_OF_ENGINE))
    return default


def batch_caps(snapshot: Snapshot, previous: dict[str, int], per_runtime: int) -> dict[str, int]:
    """How many batch lines each served model may have in flight: admission control.

    The ceiling is `batch_per_engine` per ready engine (`per_runtime` when the catalog says
    nothing), less the realtime calls in flight. When an
    engine's own queue grows (it is saturated), batch halves at once; when it is clear, batch
    grows back by an eighth of the ceiling per pass. Realtime never waits behind batch for long.
    """
    caps: dict[str, int] = {}
    ready: dict[str, list[RuntimeRecord]] = {}
    for record in snapshot.runtimes:
        if record.state == READY:
            ready.setdefault(record.model, []).append(record)
    for model, records in ready.items():
        spec = snapshot.catalog.get(model)
        ceiling = (batch_per_engine(spec, per_runtime) if spec else per_runtime) * len(records)
        waiting = sum(snapshot.engine_load.get(r.id, EngineLoad()).waiting for r in records)
        realtime = sum(snapshot.inflight.get(r.id, 0) for r in records)
        cap = previous.get(model, ceiling)
        cap = cap // 2 if waiting > 0 else cap + max(1, ceiling // 8)
        caps[model] = max(1, min(cap, ceiling - realtime))
    return caps
