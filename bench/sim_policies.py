"""The policies `bench.simulate` compares, each a `World` that decides loads, wakes and unloads.

All three place by memory (`World.free_spot`: several models share a GPU when they fit, as
Ollama places models by VRAM) and see the same calls, engines and GPUs.

- `PlanPolicy`: ours. Every 5 simulated seconds it builds a `runtimes.policy.Snapshot` of the
  world, calls `plan`, and carries the actions out the way `runtimes.control.ControlPlane` does
  (a start or a wake goes through the same `ensure_running` rules). A realtime call that finds
  no ready instance does what the web app does: it records demand and asks for a start at once
  (the fast path), then retries after each `Retry-After` until an instance is ready.
- `TtlBaseline` ("fixed TTL 300 s", llama-swap style): loads a model on its first request,
  unloads it 300 s after its last one; when it does not fit it unloads the least recently used
  models that have nothing in flight until it does, else the request waits.
- `KeepAliveBaseline` ("keep-alive 5 min + LRU", Ollama style): the same keep-alive, but when
  every loaded model is busy, a model that needs a GPU evicts the least recently used one anyway:
  that one stops taking requests, finishes those in flight, then unloads.

Neither baseline can sleep; both treat batch lines as ordinary requests (loading the model for
them, and counting lines in flight as requests in flight).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from bench.sim_trace import Call, Trace
from bench.sim_world import (
    DRAINING,
    LOADING,
    READY,
    SLEEPING,
    WAKING,
    Instance,
    JobState,
    SimulationError,
    World,
)
from runtimes.backends.base import Observed
from runtimes.control import RESERVATION_SECONDS
from runtimes.engines import EngineLoad, engine_for
from runtimes.keepalive import ArrivalHistory
from runtimes.placement import place_spec, with_reservations
from runtimes.policy import DEMAND_WINDOW_SECONDS, Action, Snapshot, plan
from runtimes.registry import RuntimeRecord

# The registry's name for each simulated state: a wake under way is still "sleeping" there
# (ControlPlane.wake changes the record only when the engine answers).
REGISTRY_STATE = {LOADING: "starting", READY: "ready", SLEEPING: "sleeping", WAKING: "sleeping",
                  DRAINING: "draining"}
ENGINE_HOST = "127.0.0.1"


def retry_after(records: list[Instance], load_seconds: float, wake_seconds: float,
                now: float) -> float:
    """The Retry-After the web app would answer (`webapp.coldstart`): the wake time when an
    engine sleeps, else the load time less what the start under way has already taken."""
    if any(r.state in (SLEEPING, WAKING) for r in records):
        estimate = wake_seconds
    else:
        estimate = load_seconds
    starting = [r.created_at for r in records if r.state == LOADING]
    remaining = estimate - (now - min(starting)) if starting else estimate
    if starting and remaining < 1:
        remaining = min(5.0, max(1.0, estimate * 0.1))
    return max(1.0, math.ceil(remaining))


# Notes for a start `ensure_running` refuses, by who asked for it.
WHY_REFUSED = {
    "call": "starts asked for by a waiting call, refused: no room (a tick makes room)",
    "plan": "starts planned by `plan`, refused at carry-out: no room",
}
WHY_REFUSED_WAKE = {
    "call": "wake-ups asked for by a waiting call, refused: its memory is taken (a tick frees it)",
    "plan": "wake-ups planned by `plan`, refused at carry-out: its memory is taken",
}


class PlanPolicy(World):
    """Ours: `runtimes.policy.plan` on a snapshot every tick, sleep mode on."""

    name = "ours (plan, sleep mode)"
    key = "ours"

    def __init__(self, trace: Trace, *, check: bool = True, tick_seconds: float = 5.0,
                 sleep_after: float | None = 120.0, idle_timeout: float = 600.0,
                 min_lifetime: float = 60.0, arrivals_window: float = 300.0):
        super().__init__(trace, check=check)
        self.tick_seconds = tick_seconds
        self.sleep_after = sleep_after
        self.idle_timeout = idle_timeout
        self.min_lifetime = min_lifetime
        self.arrivals_window = arrivals_window
        # vLLM with sleep mode, so `can_sleep` comes from the engine as in ControlPlane.
        self.catalog = dict(self.specs)
        self.can_sleep = frozenset(s.id for s in self.catalog.values()
                                   if engine_for(s).can_sleep(s))
        self.demand: dict[str, float] = {}
        self.demand_since: dict[str, float] = {}
        # Calls as the web app counts them: every call, a retry after a 503 included.
        self.arrived: dict[str, deque[float]] = {m: deque() for m in self.models}
        self.history = ArrivalHistory()
        self.retries: list[tuple[float, int, Call]] = []
        self.asked: dict[str, int] = {}
        self.actions: list[tuple[float, Action]] = []
        # GPUs freed by an eviction, and the model they were freed for (a diagnostic).
        self.evicted_for: dict[tuple[str, int], str] = {}
        # As the registry keeps them: GPUs set aside for a model, until a time.
        self.reserved: dict[str, tuple[str, tuple[int, ...], float]] = {}

    # -- what the web app does -------------------------------------------------------------

    def _arrive(self, model: str, at: float) -> None:
        self.arrived[model].append(at)
        self.history.add(model, int(at // self.history.bucket_seconds))

    def route(self, call: Call) -> None:
        self._arrive(call.model, call.arrival)
        super().route(call)

    def on_waiting(self, call: Call, now: float) -> None:
        self._ask_again(call, now)

    def _ask_again(self, call: Call, now: float) -> None:
        """A 503 for a waiting call: demand noted, a start asked for, a retry scheduled."""
        self.demand[call.model] = now
        self.demand_since.setdefault(call.model, now)
        # The web app asks once per model until that start task is done (a Redis SET NX); the
        # task here is done at once, so once a second stands for it.
        if self.asked.get(call.model) != math.floor(now):
            self.asked[call.model] = math.floor(now)
            self.ensure_running(call.model, 1, now)
        model = self.models[call.model]
        delay = retry_after(self.of_model(call.model), model.load_seconds, model.wake_seconds,
                            now)
        heapq.heappush(self.retries, (now + delay, call.id, call))

    def on_ready(self, inst: Instance) -> None:
        # ControlPlane clears a model's demand when an instance becomes ready or wakes.
        self.demand.pop(inst.model, None)
        self.demand_since.pop(inst.model, None)

    def reservations(self, now: float) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {m: (h, g) for m, (h, g, until) in self.reserved.items() if until > now}

    def free_spot(self, model: str, now: float = 0.0) -> tuple[str, tuple[int, ...]] | None:
        """As `ControlPlane._claim_start` places: memory set aside for other models is taken."""
        taken = with_reservations(self.held(), self.reservations(now), model, self.catalog,
                                  self.gpu_memory)
        return place_spec(self.specs[model], self.inventory, self.gpu_memory, taken)

    def launch(self, model: str, now: float, spot: tuple[str, tuple[int, ...]]) -> Instance:
        self.reserved.pop(model, None)
        host, gpus = spot
        meant = {self.evicted_for.pop((host, g)) for g in gpus if (host, g) in self.evicted_for}
        if meant and model not in meant:
            self.notes["evictions whose GPU went to another model"] += 1
        return super().launch(model, now, spot)

    # -- what the control plane does -------------------------------------------------------

    def ensure_running(self, model: str, replicas: int, now: float,
                       source: str = "call") -> None:
        """`ControlPlane.ensure_running`: wake a sleeping instance when none is ready or
        starting (if its memory is free again), else start one where it fits unless the model
        has `replicas` live ones."""
        mine = self.of_model(model)
        asleep = [i for i in mine if i.state in (SLEEPING, WAKING)]
        if asleep and not any(i.state in (READY, LOADING) for i in mine):
            if not any(i.state == WAKING for i in asleep):
                taken = with_reservations(self.held(), self.reservations(now), model,
                                          self.catalog, self.gpu_memory)
                if not self.wake_fits(asleep[0], taken):
                    self.notes[WHY_REFUSED_WAKE[source]] += 1
                    return
                self.reserved.pop(model, None)  # as ControlPlane._claim_wake
                self.begin_wake(asleep[0], now)
            return
        live = [i for i in mine if i.state != DRAINING]
        if len(live) >= min(max(replicas, 1), self.catalog[model].max_replicas):
            return
        spot = self.free_spot(model, now)
        if spot is None:
            # The placement lock finds no room; the autoscaler has to make room first.
            self.notes[WHY_REFUSED[source]] += 1
            return
        self.launch(model, now, spot)

    def on_step(self, t: float) -> None:
        while self.retries and self.retries[0][0] <= t:
            at, _, call = heapq.heappop(self.retries)
            if call.id in self.waiting_ids:
                self._arrive(call.model, at)
                self._ask_again(call, at)
        if t % self.tick_seconds == 0:
            self.tick(t)

    def snapshot(self, now: float) -> Snapshot:
        records, observed, inflight, last_used, load = [], [], {}, {}, {}
        for inst in self.instances.values():
            spec = self.catalog[inst.model]
            state = REGISTRY_STATE[inst.state]
            records.append(RuntimeRecord(
                id=inst.id, model=inst.model, engine=spec.engine, backend="sim", state=state,
                host=ENGINE_HOST, port=0, handle=inst.id, gpus=inst.gpus,
                gpu_host=inst.gpu_host, fingerprint=spec.fingerprint,
                created_at=inst.created_at, state_since=inst.state_since,
                ready_at=inst.ready_at,
                meta={"evicted_for": getattr(inst, "evicted_for", ""),
                      "then": getattr(inst, "then", "")},
            ))
            observed.append(Observed(
                instance_id=inst.id, model=inst.model, engine=spec.engine, handle=inst.id,
                host=ENGINE_HOST, port=0, running=True, fingerprint=spec.fingerprint,
                gpus=inst.gpus, gpu_host=inst.gpu_host, started_at=inst.created_at,
            ))
            inflight[inst.id] = inst.inflight(now)
            if inst.last_used:
                last_used[inst.id] = inst.last_used
            if inst.state == READY:
                load[inst.id] = EngineLoad(waiting=inst.queued(now), running=inst.running(now))
        arrivals = {}
        for model, times in self.arrived.items():
            while times and times[0] <= now - self.arrivals_window:
                times.popleft()
            if times:
                arrivals[model] = len(times)
        pending = {m: n for m in self.models if (n := self.batch_pending(m))}
        return Snapshot(
            now=now, catalog=dict(self.catalog), runtimes=records, observed=observed,
            demand=dict(self.demand), last_used=last_used, inflight=inflight,
            default_idle_timeout=self.idle_timeout, gpu_inventory=self.inventory,
            arrivals=arrivals, batch_pending=pending, engine_load=load,
            can_sleep=self.can_sleep, sleep_after_seconds=self.sleep_after,
            min_lifetime=self.min_lifetime, reservations=self.reservations(now),
            gpu_memory=self.gpu_memory, arrivals_window=self.arrivals_window,
            demand_since=dict(self.demand_since), history=self.history.snapshot(now),
            # What the registry's medians of observed starts and wake-ups would say.
            start_seconds={m.id: m.load_seconds for m in self.models.values()},
            wake_seconds={m.id: m.wake_seconds for m in self.models.values()},
        )

    def tick(self, now: float) -> None:
        for model, queue in self.waiting.items():
            seen_at = self.demand.get(model)
            if (queue and not self.of_model(model, LOADING, SLEEPING, WAKING, READY)
                    and (seen_at is None or now - seen_at >= DEMAND_WINDOW_SECONDS)):
                # Callers wait on Retry-After (up to a whole load time) between retries, longer
                # than the policy keeps demand: until they retry, nothing asks for a start.
                self.notes["ticks with calls waiting that plan no longer counts as demand"] += 1
        for action in plan(self.snapshot(now)):
            self.actions.append((now, action))
            self.carry_out(action, now)

    def carry_out(self, action: Action, now: float) -> None:
        inst = self.instances.get(action.instance_id)
        kind = action.kind
        if kind == "start":
            self.ensure_running(action.model, action.replicas, now, source="plan")
        elif kind == "wake":
            self.ensure_running(action.model, 1, now, source="plan")
        elif kind == "sleep":
            # ControlPlane.sleep: a ready engine, or a drained one the eviction wants asleep.
            if inst is not None and inst.state in (READY, DRAINING):
                if inst.inflight(now):
                    raise SimulationError(f"plan put {inst.id} to sleep with calls in flight")
                if action.evicted_for and inst.state == READY:
                    self._note_eviction(inst, action, now)
                inst.state, inst.state_since = SLEEPING, now
                self._reserve(inst, action, now)
        elif kind == "drain":
            if inst is not None and inst.state == READY:  # the registry's compare-and-set
                inst.state, inst.state_since = DRAINING, now
                inst.evicted_for = action.evicted_for  # as ControlPlane keeps it in meta
                inst.then = action.then
                if action.evicted_for:
                    self._note_eviction(inst, action, now)
                    self._reserve(inst, action, now)
        elif kind == "stop":
            if inst is not None:
                if action.evicted_for and inst.state != DRAINING:
                    self._note_eviction(inst, action, now)
                elif inst.state in (SLEEPING, WAKING) and self.waiting[inst.model]:
                    # A wake would have served the call in seconds; a start takes a full load.
                    self.notes["sleeping engines stopped as idle while a call for them waited"] += 1
                self._reserve(inst, action, now)
                self.stop(inst, now)
        else:
            # adopt / forget / mark_failed: nothing in this world should cause them.
            self.notes[f"unexpected action {kind}"] += 1

    def _reserve(self, inst: Instance, action: Action, now: float) -> None:
        """As ControlPlane: the memory an eviction frees is set aside for the model it was for."""
        if action.evicted_for and inst.gpus:
            self.reserved[action.evicted_for] = (inst.gpu_host, inst.gpus,
                                                 now + RESERVATION_SECONDS)
            for gpu in inst.gpus:
                self.evicted_for[(inst.gpu_host, gpu)] = action.evicted_for

    def _note_eviction(self, inst: Instance, action: Action, now: float) -> None:
        self.evictions += 1
        if inst.state == READY and now - (inst.ready_at or inst.created_at) < self.min_lifetime:
            self.notes[f"evictions of an engine ready for less than {self.min_lifetime:.0f} s"] += 1
        if inst.inflight(now) and action.kind != "drain":
            self.notes["evictions of an engine with calls in flight, not drained"] += 1
        if action.kind == "sleep" or action.then == "sleep":
            self.notes["evictions made by putting an engine to sleep"] += 1


class SwapBaseline(World):
    """Load on request, unload after a keep-alive, swap out the least recently used model."""

    keep_alive = 300.0
    evict_busy = False  # Ollama: yes (drain it first); llama-swap: only a model with none in flight

    def __init__(self, trace: Trace, *, check: bool = True):
        super().__init__(trace, check=check)
        # When each model was last unloaded: its batch lines wait from then on.
        self.unloaded_at: dict[str, float] = {}

    def on_waiting(self, call: Call, now: float) -> None:
        self._serve_wants(now)

    def after_arrivals(self, t: float) -> None:
        self._serve_wants(t)

    def on_step(self, t: float) -> None:
        for inst in list(self.instances.values()):
            if inst.state == DRAINING and not inst.inflight(t):
                self._unload(inst, t)
            elif (inst.state == READY and not inst.inflight(t) and not self._batch_busy(inst, t)
                  and t - inst.last_used >= self.keep_alive):
                self._unload(inst, t)
        self._serve_wants(t)

    def _unload(self, inst: Instance, now: float) -> None:
        self.unloaded_at[inst.model] = now
        self.stop(inst, now)

    def _batch_busy(self, inst: Instance, now: float) -> bool:
        # The batch client keeps lines in flight on a loaded model while it has lines queued
        # for it (from the moment the engine is ready, before this step's lines are counted).
        return inst.state == READY and any(
            j.job.submitted <= now for j in self.queued_jobs[inst.model])

    def _wants(self, now: float) -> list[tuple[float, str]]:
        """Models with requests waiting and no instance loaded or loading, oldest request
        first.

        The batch client is a polite one: it sends the lines of every job whose model is
        loaded, but only the most urgent job's lines may pull a model in. (A client that asks
        for two unloaded models at once makes both baselines swap them in turn every few lines.)
        """
        queued = [j for q in self.queued_jobs.values() for j in q if j.job.submitted <= now]
        head = min(queued, key=JobState.order, default=None)
        wants = []
        for model in self.models:
            if self.of_model(model, READY, LOADING):
                continue
            since = []
            if self.waiting[model]:
                since.append(self.waiting[model][0].arrival)
            if head is not None and head.job.model == model:
                first = head.job.submitted
                since.append(max(first, self.unloaded_at.get(model, first)))
            if since:
                wants.append((min(since), model))
        return sorted(wants)

    def _serve_wants(self, now: float) -> None:
        for _, model in self._wants(now):
            spot = self.free_spot(model)
            # Like Ollama's scheduler: unload the least recently used until the model fits.
            while spot is None:
                if any(i.state == DRAINING for i in self.instances.values()):
                    break  # a swap is under way: its memory comes free when it has drained
                victim = self._victim(model, now)
                if victim is None:
                    break
                self.evictions += 1
                if victim.inflight(now) or self._batch_busy(victim, now):
                    victim.state, victim.state_since = DRAINING, now
                    break
                self._unload(victim, now)
                spot = self.free_spot(model)
            if spot is not None:
                self.launch(model, now, spot)

    def _victim(self, model: str, now: float) -> Instance | None:
        """The least recently used loaded model with nothing in flight; with `evict_busy`,
        failing that, the least recently used busy one (Ollama's scheduler does the same)."""
        candidates = [i for i in self.instances.values()
                      if i.state == READY and i.model != model]
        idle = [i for i in candidates if not i.inflight(now) and not self._batch_busy(i, now)]
        if idle or not self.evict_busy:
            candidates = idle
        return min(candidates, key=lambda i: (i.last_used, i.id), default=None)


class TtlBaseline(SwapBaseline):
    name = "fixed TTL 300 s (llama-swap style)"
    key = "ttl"
    evict_busy = False


class KeepAliveBaseline(SwapBaseline):
    name = "keep-alive 5 min + LRU (Ollama style)"
    key = "keepalive-lru"
    evict_busy = True


POLICIES = (PlanPolicy, TtlBaseline, KeepAliveBaseline)
