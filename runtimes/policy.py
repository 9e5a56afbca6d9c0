"""The autoscaling policy: a pure function from a snapshot of the world to a list of actions.

`plan(snapshot)` does no I/O, so it is tested with tables and replayed on traces
(`bench/simulate.py`). Every action carries a one-line reason, shown on the dashboard and in the
decisions API. In order, it:

1. reconciles the registry with what the backend runs (adopt, forget, mark failed, stop strays);
2. keeps idle engines by their model's own history (`runtimes.keepalive`): awake for the tail of
   its idle periods, then asleep (where the engine can sleep), stopped after the tail of its long
   pauses; an asleep engine whose calls predictably come back after a pause is woken ahead;
3. finds what is wanted: a realtime call waiting for a cold or sleeping model, batch lines
   waiting for one, fewer instances than `min_replicas`, or a busy model (engine queue above a
   threshold) that may scale out up to `max_replicas`;
4. places each wanted start or wake by GPU memory (`runtimes.placement`), realtime first; when it
   does not fit, it evicts by value (`runtimes.eviction`): the room that costs the least waiting
   (put to sleep before stopped, never with calls in flight without draining them first), and
   for a realtime call only once its callers have waited longer than the swap will make others
   wait (rent until the price of buying: a model called once a minute waits for a busy one, a
   burst of calls for a cold model gets its room at once). Batch work, warm-keeping and
   scale-out never push out a model with realtime traffic, nor an engine younger than
   `min_lifetime` that would have to be stopped.

Hysteresis: a model scales out only when none of its instances is starting, and scales in only
after its keep-alive; the cost of a swap includes the way back, so two models do not trade a GPU
back and forth faster than their callers gain from it.
"""

from __future__ import annotations

import dataclasses

from runtimes.catalog import ModelSpec
from runtimes.engines import EngineLoad, engine_for
from runtimes.eviction import SLEEP, STOP, evict_action, room_for, worth_it
from runtimes.placement import footprint, held_memory, place_spec, with_reservations
from runtimes.registry import DRAINING, FAILED, READY, SLEEPING, STARTING, RuntimeRecord
from runtimes.snapshot import (
    BATCH,
    DEFAULT_START_SECONDS,
    DEFAULT_WAKE_SECONDS,
    DEMAND_WINDOW_SECONDS,
    LAUNCH_GRACE_SECONDS,
    MAX_FAILED_STARTS,
    MIN_REPLICAS,
    PREWARM,
    REALTIME,
    SCALE_OUT,
    URGENCY,
    Action,
    Snapshot,
    Want,
    grown,
    keep_alive_for,
    last_active,
    prewarm_due,
    prewarmed,
    sleeps,
    wake_estimate,
    wake_fits,
    wanted_since,
)

# The policy's types and constants are used through this module by the control plane, the
# simulator and the tests.
__all__ = [
    "DEFAULT_START_SECONDS", "DEFAULT_WAKE_SECONDS", "DEMAND_WINDOW_SECONDS",
    "LAUNCH_GRACE_SECONDS", "MAX_FAILED_STARTS", "Action", "Snapshot", "Want", "batch_caps",
    "batch_per_engine", "keep_alive_for", "plan", "restart_backoff",
]

def restart_backoff(failed_starts: int, base: float = 5.0) -> float:
    """Seconds to wait after the n-th failed start in a row before trying again."""
    return min(300.0, base * 2 ** max(0, failed_starts - 1))


def plan(snapshot: Snapshot) -> list[Action]:
    actions, live = _reconcile(snapshot)
    leaving: set[str] = set()
    idle = _idle_and_drain(snapshot, live, leaving)
    # Engines put to sleep now hold only their context for the starts below (the control plane
    # carries the actions out in order), and are no one's victims.
    dozing = {a.instance_id for a in idle if a.kind == "sleep"}
    live = {model: [dataclasses.replace(r, state=SLEEPING, state_since=snapshot.now)
                    if r.id in dozing else r for r in records]
            for model, records in live.items()}
    return actions + idle + _starts_and_evictions(snapshot, live, leaving)


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
        launching = record.state == STARTING and now - record.created_at < LAUNCH_GRACE_SECONDS
        if inst is None:
            if launching:
                live.setdefault(record.model, []).append(record)
            else:
                actions.append(Action("forget", "no longer run by the backend", record.model,
                                      record.id))
            continue
        if not inst.running and inst.exit_code is None and launching:
            # Not running, yet it never exited: made and about to run. Taken for an engine that
            # exited, it would be marked failed and a second one started.
            live.setdefault(record.model, []).append(record)
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


# -- idle engines ------------------------------------------------------------------------------


def _idle_and_drain(snapshot: Snapshot, live: dict[str, list[RuntimeRecord]],
                    leaving: set[str]) -> list[Action]:
    actions: list[Action] = []
    now = snapshot.now
    for model, records in live.items():
        spec = snapshot.catalog[model]
        keep = keep_alive_for(snapshot, spec)
        goes_to_sleep = sleeps(snapshot, spec)
        serving = [r for r in records if r.state in (READY, SLEEPING)]
        # Batch lines waiting for the model mean it is not idle, even if none reached it lately.
        busy_with_batch = snapshot.batch_pending.get(model, 0) > 0
        wanted_at = snapshot.demand.get(model)
        for record in sorted(serving, key=lambda r: last_active(snapshot, r)):
            if busy_with_batch or snapshot.inflight.get(record.id, 0):
                continue
            if record.state == SLEEPING and wanted_since(snapshot, wanted_at, record.state_since):
                continue  # a caller waits for it: it is woken, not stopped
            if prewarmed(snapshot, record, keep):
                continue  # awake for the call its history predicts
            idle = now - last_active(snapshot, record)
            if idle >= keep.stop and len(serving) > spec.min_replicas:
                reason = f"idle for {idle:.0f} s (stop after {keep.stop:.0f} s: {keep.basis})"
                # Nothing can be in flight on a sleeping engine: it stops at once.
                kind = "stop" if record.state == SLEEPING else "drain"
                actions.append(Action(kind, reason, model, record.id))
                serving.remove(record)
                leaving.add(record.id)
            elif record.state == READY and goes_to_sleep and keep.awake <= idle < keep.stop:
                wake = wake_estimate(snapshot, model)
                actions.append(Action(
                    "sleep", f"idle for {idle:.0f} s (sleep after {keep.awake:.0f} s: "
                    f"{keep.basis}); wakes in ~{wake:.0f} s", model, record.id))
        for record in records:
            if record.state != DRAINING:
                continue
            leaving.add(record.id)
            inflight = snapshot.inflight.get(record.id, 0)
            evicted_for = record.meta.get("evicted_for", "")
            if inflight == 0 and record.meta.get("then") == SLEEP and goes_to_sleep:
                actions.append(Action("sleep", f"drained: asleep to free memory for "
                                      f"{evicted_for or 'another model'}", model, record.id,
                                      evicted_for=evicted_for))
            elif inflight == 0:
                actions.append(Action("stop", "drained: no calls in flight", model, record.id,
                                      evicted_for=evicted_for))
            elif now - record.state_since > snapshot.drain_timeout:
                actions.append(Action("stop", f"drain timed out with {inflight} calls in flight",
                                      model, record.id, evicted_for=evicted_for))
    return actions


# -- what is wanted ----------------------------------------------------------------------------


def _wanted(snapshot: Snapshot, live: dict[str, list[RuntimeRecord]],
            leaving: set[str]) -> list[Want]:
    """Each start or wake-up wanted, with why."""
    wanted: list[Want] = []
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
        if asleep and not ready and not starting:
            # A call noted before the engine went to sleep was served before it did: not a
            # reason to wake it (that would flap between sleep and wake).
            woken_by_call = wanted_since(snapshot, wanted_at, asleep[0].state_since)
            if woken_by_call or batch_waiting:
                why = "realtime call waiting" if woken_by_call else f"{batch_waiting} batch lines"
                wanted.append(Want(REALTIME if woken_by_call else BATCH, model,
                                   f"{why}: wake the sleeping engine", wake=asleep[0]))
                continue
            prewarm = prewarm_due(snapshot, spec, asleep[0])
            if prewarm:
                wanted.append(Want(PREWARM, model, prewarm, wake=asleep[0]))
                continue
        more = len(records) + 1
        if not records and realtime_waiting:
            wanted.append(Want(REALTIME, model, "realtime call waiting for a cold model"))
        elif len(records) < spec.min_replicas:
            wanted.append(Want(MIN_REPLICAS, model, f"below min_replicas={spec.min_replicas}",
                               more))
        elif not records and batch_waiting:
            wanted.append(Want(BATCH, model, f"{batch_waiting} batch lines waiting"))
        elif ready and not starting and len(records) < spec.max_replicas:
            waiting = sum(snapshot.engine_load.get(r.id, EngineLoad()).waiting for r in ready)
            if waiting / len(ready) > snapshot.scale_out_waiting:
                wanted.append(Want(SCALE_OUT, model,
                                   f"busy: {waiting:.0f} calls queued in {len(ready)} engine(s)",
                                   more))
    return wanted


# -- starts, wake-ups and the evictions they need ----------------------------------------------


def _starts_and_evictions(snapshot: Snapshot, live: dict[str, list[RuntimeRecord]],
                          leaving: set[str]) -> list[Action]:
    wants = _wanted(snapshot, live, leaving)
    actions: list[Action] = []
    holding = [r for records in live.values() for r in records]
    alive = [r for r in holding if r.id not in leaving]
    # Memory stays held until its instance is gone: a draining engine still holds it.
    held = held_memory(holding, snapshot.catalog, snapshot.gpu_memory)
    # GPUs freed by an eviction go to the model they were freed for, not back to the model
    # evicted (whose callers, refused meanwhile, want it back at once).
    owed = {r.meta.get("evicted_for") for r in holding if r.id in leaving or r.state == DRAINING}
    wants.sort(key=lambda w: (URGENCY[w.kind], w.model not in owed,
                              snapshot.demand.get(w.model, snapshot.now)))
    for want in wants:
        model, spec = want.model, snapshot.catalog[want.model]
        if want.wake is None and model in snapshot.weights_missing:
            # It cannot start before its weights are here: evict nothing for it yet. A start
            # asks for the download (and claims no GPU), unless one is under way.
            if model not in snapshot.downloading:
                actions.append(Action("start", f"{want.reason}; its weights are downloaded first",
                                      model, replicas=want.replicas))
            continue
        taken = with_reservations(held, snapshot.reservations, model, snapshot.catalog,
                                  snapshot.gpu_memory)
        if not snapshot.gpu_inventory:
            # GPUs are not managed: everything fits.
            actions.append(_go(want))
            continue
        if want.wake is not None:
            if wake_fits(snapshot, want.wake, taken):
                held = grown(held, snapshot, want.wake)
                actions.append(_go(want))
                continue
        else:
            spot = place_spec(spec, snapshot.gpu_inventory, snapshot.gpu_memory, taken)
            if spot is not None:
                host, gpus = spot
                need = footprint(spec, snapshot.gpu_memory.get(host)).awake
                on_host = held.setdefault(host, {})
                for gpu in gpus:
                    on_host[gpu] = on_host.get(gpu, 0.0) + need
                actions.append(_go(want))
                continue
        if want.kind == PREWARM:
            continue  # a guess never pushes anything out
        room = room_for(snapshot, want, alive, taken)
        if room is None:
            continue
        verdict = worth_it(snapshot, want, room)
        if not verdict:
            continue
        for victim in room.victims:
            actions.append(evict_action(snapshot, victim, model, verdict))
            alive.remove(victim.record)
            if victim.mode == STOP or snapshot.inflight.get(victim.record.id, 0):
                leaving.add(victim.record.id)
    return actions


def _go(want: Want) -> Action:
    if want.wake is not None:
        return Action("wake", want.reason, want.model, want.wake.id)
    return Action("start", want.reason, want.model, replicas=want.replicas)


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
