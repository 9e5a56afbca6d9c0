"""The simulated GPU box that every policy of `bench.simulate` drives, in 1-second steps.

`World` owns what is the same for every policy: engine instances on GPUs, how realtime calls are
queued and served, how batch lines are worked off, the bookkeeping of waits, loads and GPU time,
and the invariant checks. A policy (see `bench.sim_policies`) decides when to load, wake, sleep
and unload, through the hooks `on_step`, `on_waiting` and `after_arrivals`.

Time advances in steps of one second, but waits are computed from exact times: an instance that
finishes loading at 431.7 s serves the calls waiting for it from 431.7 s, and a call queued
behind a full engine starts when a slot frees. An engine is a FIFO queue with `concurrency`
slots (the trace's); a call holds a slot for its service time. Batch lines use the slots realtime
calls leave free (realtime always first), each for its job's `line_seconds`, on awake instances
only, most urgent job first.

GPU memory is modelled as the real placer models it (`runtimes.placement`), for every policy
alike: an instance holds its footprint on each of its GPUs (awake: weights, KV cache and
overhead; asleep: its context), a GPU never holds more than its usable memory, and a model of
unknown size (or a GPU of unknown memory) takes the GPU whole. GPU time is counted by the share
of each GPU's memory an instance holds (the whole GPU when it takes it whole), so an idle 8 GB
model beside a busy one counts as the part of the GPU it keeps from others.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from bench.sim_trace import BatchJob, Call, SimModel, Trace
from runtimes.catalog import ModelSpec
from runtimes.placement import (
    WHOLE_GPU,
    Footprint,
    Held,
    capacity,
    fits,
    footprint,
    place_spec,
)

LOADING, READY, SLEEPING, WAKING, DRAINING = "loading", "ready", "sleeping", "waking", "draining"
# Where the GPU time of an instance goes, per state (READY and DRAINING split into busy/idle).
AWAKE = (READY, DRAINING)

STEP_SECONDS = 1.0
# After the last arrival, how long the run may go on to finish batch work and unload.
TAIL_SECONDS = 26 * 3600.0


class SimulationError(RuntimeError):
    """The simulated world became inconsistent (a bug in the simulator or a policy)."""


@dataclass
class Instance:
    id: str
    model: str
    gpu_host: str
    gpus: tuple[int, ...]
    state: str
    created_at: float
    state_since: float
    ready_at: float | None = None  # when it last became ready (load or wake)
    due: float | None = None  # when the load or wake under way completes
    readiness: str = "load"  # how it became, or is becoming, ready: load | wake
    readiness_id: int = 0  # which load or wake, to count those a call waited for
    slots: list[float] = field(default_factory=list)  # end times of calls holding slots (heap)
    calls: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, call id)
    covered_until: float = 0.0  # realtime calls keep it busy until then
    last_used: float = 0.0
    batch_at: float = -math.inf  # start of the last step in which it worked on batch lines

    def prune(self, now: float) -> None:
        """Forget the calls that have ended by `now`; they count as its last use."""
        keep = []
        for start, end, call_id in self.calls:
            if end <= now:
                self.last_used = max(self.last_used, end)
            else:
                if start <= now:
                    self.last_used = max(self.last_used, start)
                keep.append((start, end, call_id))
        self.calls = keep

    def inflight(self, now: float) -> int:
        self.prune(now)
        return len(self.calls)

    def running(self, now: float) -> int:
        self.prune(now)
        return sum(1 for start, _, _ in self.calls if start <= now)

    def queued(self, now: float) -> int:
        self.prune(now)
        return sum(1 for start, _, _ in self.calls if start > now)


@dataclass(frozen=True)
class Served:
    """How one realtime call went: its wait and what it waited for ("", "load" or "wake")."""

    model: str
    wait: float
    waited_for: str
    readiness_id: int


@dataclass
class JobState:
    job: BatchJob
    remaining: float
    finished_at: float | None = None

    def order(self) -> tuple:
        return (self.job.priority, self.job.deadline, self.job.submitted, self.job.id)


@dataclass
class Result:
    """Everything a run produced; `bench.simulate` turns it into the report."""

    policy: str
    key: str
    trace: Trace
    served: dict[int, Served]
    jobs: dict[int, JobState]
    gpu_seconds: Counter
    loads: int
    wakes: int
    evictions: int
    end: float  # when the run stopped: all work done and every engine unloaded, or the cap
    capped: bool
    notes: Counter
    unserved: int
    sleep_after: float | None = None  # the policy's SLEEP_AFTER_SECONDS, if it sleeps engines


def model_spec(model: SimModel) -> ModelSpec:
    """The catalog entry of a simulated model: vLLM with sleep mode, sized as the trace says."""
    return ModelSpec(id=model.id, engine="vllm", gpus=model.gpus, args=("--enable-sleep-mode",),
                     expected_start_seconds=model.load_seconds, weights_gb=model.weights_gb,
                     kv_cache_gb=model.kv_cache_gb, fingerprint=f"sim-{model.id}")


class World:
    """The box, its engines and the demand; subclasses are the policies."""

    name = "world"
    key = "world"  # the short name of the JSON output

    def __init__(self, trace: Trace, *, check: bool = True):
        self.trace = trace
        self.models = {m.id: m for m in trace.models}
        self.specs = {m.id: model_spec(m) for m in trace.models}
        self.inventory = trace.gpu_inventory
        self.gpu_memory = dict(trace.gpu_memory)
        self.concurrency = trace.concurrency
        self._footprints: dict[tuple[str, str], Footprint] = {}
        self.check = check
        self.instances: dict[str, Instance] = {}
        self.waiting: dict[str, deque[Call]] = {m: deque() for m in self.models}
        self.waiting_ids: set[int] = set()
        self.queued_jobs: dict[str, list[JobState]] = {m: [] for m in self.models}
        self.jobs: dict[int, JobState] = {}
        self.served: dict[int, Served] = {}
        self.gpu_seconds: Counter = Counter()
        self.loads = 0
        self.wakes = 0
        self.evictions = 0
        self.notes: Counter = Counter()
        self._serial = 0

    # -- hooks for the policies ------------------------------------------------------------

    def on_step(self, t: float) -> None:
        """Start of the step [t, t+1): loads and wakes due by t are done."""

    def on_waiting(self, call: Call, now: float) -> None:
        """`call` found no ready instance of its model at `now` and waits."""

    def after_arrivals(self, t: float) -> None:
        """The calls and jobs of the step have arrived."""

    def on_ready(self, inst: Instance) -> None:
        """`inst` has just finished loading or waking."""

    # -- instances -------------------------------------------------------------------------

    def _next_id(self) -> int:
        self._serial += 1
        return self._serial

    # -- memory ----------------------------------------------------------------------------

    def footprint(self, model: str, host: str) -> Footprint:
        key = (model, host)
        if key not in self._footprints:
            self._footprints[key] = footprint(self.specs[model], self.gpu_memory.get(host))
        return self._footprints[key]

    def holds(self, inst: Instance) -> float:
        """GB per GPU `inst` holds in its state (a wake under way holds the awake size)."""
        fp = self.footprint(inst.model, inst.gpu_host)
        return fp.asleep if inst.state == SLEEPING else fp.awake

    def held(self) -> Held:
        held: Held = {}
        for inst in self.instances.values():
            on_host = held.setdefault(inst.gpu_host, {})
            for gpu in inst.gpus:
                on_host[gpu] = on_host.get(gpu, 0.0) + self.holds(inst)
        return held

    def share(self, inst: Instance) -> float:
        """The share of each of its GPUs `inst` keeps from others: what GPU time counts."""
        held, memory = self.holds(inst), self.gpu_memory.get(inst.gpu_host)
        return 1.0 if held == WHOLE_GPU or not memory else min(1.0, held / memory)

    def wake_fits(self, inst: Instance, held: Held | None = None) -> bool:
        """Whether the asleep `inst`'s weights and KV cache fit back on its GPUs."""
        fp = self.footprint(inst.model, inst.gpu_host)
        if fp.whole:
            return True
        on_host = (self.held() if held is None else held).get(inst.gpu_host, {})
        memory = self.gpu_memory.get(inst.gpu_host)
        return all(fits(max(0.0, on_host.get(g, 0.0) - fp.asleep), fp.awake, memory)
                   for g in inst.gpus)

    def free_spot(self, model: str) -> tuple[str, tuple[int, ...]] | None:
        return place_spec(self.specs[model], self.inventory, self.gpu_memory, self.held())

    def launch(self, model: str, now: float, spot: tuple[str, tuple[int, ...]]) -> Instance:
        """A cold load of `model` on the GPUs of `spot`, ready after the model's load time."""
        host, gpus = spot
        need = self.footprint(model, host).awake
        on_host = self.held().get(host, {})
        if not all(fits(on_host.get(g, 0.0), need, self.gpu_memory.get(host)) for g in gpus):
            raise SimulationError(f"{self.name}: {model} does not fit on GPUs {gpus} of {host}")
        serial = self._next_id()
        inst = Instance(id=f"rt-{serial:05d}", model=model, gpu_host=host, gpus=gpus,
                        state=LOADING, created_at=now, state_since=now,
                        due=now + self.models[model].load_seconds, readiness="load",
                        readiness_id=serial)
        self.instances[inst.id] = inst
        self.loads += 1
        self.check_gpus()
        return inst

    def begin_wake(self, inst: Instance, now: float) -> None:
        if inst.state != SLEEPING:
            raise SimulationError(f"{self.name}: wake of {inst.id} in state {inst.state}")
        if not self.wake_fits(inst):
            raise SimulationError(f"{self.name}: wake of {inst.id} does not fit its GPUs")
        inst.state = WAKING
        inst.due = now + self.models[inst.model].wake_seconds
        inst.readiness = "wake"
        inst.readiness_id = self._next_id()
        self.wakes += 1

    def stop(self, inst: Instance, now: float) -> None:
        """Unload at once: its GPUs are free for the next start."""
        cut = [c for c in inst.calls if c[1] > now]
        if cut:
            # Only a stop that a drain timeout forces could do this; the calls go back to wait.
            self.notes["realtime calls cut off by a stop"] += len(cut)
            by_id = {c.id: c for c in self.trace.calls}
            del self.instances[inst.id]
            for _, _, call_id in sorted(cut):
                del self.served[call_id]
                self._enqueue_waiting(by_id[call_id])
                self.on_waiting(by_id[call_id], now)
        else:
            del self.instances[inst.id]
        self.check_gpus()

    def check_gpus(self) -> None:
        """Only GPUs of the inventory; a GPU taken whole by one instance alone; no GPU holding
        more than its usable memory."""
        if not self.check:
            return
        holders: dict[tuple[str, int], list[float]] = {}
        for inst in self.instances.values():
            if len(inst.gpus) != self.models[inst.model].gpus:
                raise SimulationError(f"{self.name}: {inst.id} holds {inst.gpus}")
            for gpu in inst.gpus:
                key = (inst.gpu_host, gpu)
                if gpu not in self.inventory.get(inst.gpu_host, ()):
                    raise SimulationError(f"{self.name}: GPU {key} is not in the inventory")
                holders.setdefault(key, []).append(self.holds(inst))
        for (host, gpu), amounts in holders.items():
            if WHOLE_GPU in amounts and len(amounts) > 1:
                raise SimulationError(f"{self.name}: GPU {(host, gpu)} held by two instances")
            cap = capacity(self.gpu_memory.get(host))
            if WHOLE_GPU not in amounts and cap is not None and sum(amounts) > cap + 1e-6:
                raise SimulationError(f"{self.name}: GPU {(host, gpu)} holds {sum(amounts):.1f} "
                                      f"GB, more than its {cap:.1f}")

    def of_model(self, model: str, *states: str) -> list[Instance]:
        return [i for i in self.instances.values()
                if i.model == model and (not states or i.state in states)]

    # -- realtime calls --------------------------------------------------------------------

    def route(self, call: Call) -> None:
        ready = self.of_model(call.model, READY)
        if ready:
            self.assign(call, min(ready, key=lambda i: (i.inflight(call.arrival), i.id)))
        else:
            self._enqueue_waiting(call)
            self.on_waiting(call, call.arrival)

    def _enqueue_waiting(self, call: Call) -> None:
        self.waiting[call.model].append(call)
        self.waiting_ids.add(call.id)

    def assign(self, call: Call, inst: Instance) -> None:
        """Queue `call` on `inst`: it starts when the engine is ready and a slot is free."""
        if call.id in self.served:
            raise SimulationError(f"{self.name}: call {call.id} served twice")
        start = max(call.arrival, inst.ready_at or call.arrival)
        while inst.slots and inst.slots[0] <= start:
            heapq.heappop(inst.slots)
        if len(inst.slots) >= self.concurrency:
            start = max(start, heapq.heappop(inst.slots))
        end = start + call.service
        heapq.heappush(inst.slots, end)
        inst.calls.append((start, end, call.id))
        inst.covered_until = max(inst.covered_until, end)
        waited_for = inst.readiness if (inst.ready_at or 0.0) > call.arrival else ""
        self.served[call.id] = Served(call.model, start - call.arrival, waited_for,
                                      inst.readiness_id if waited_for else 0)

    def _complete_transitions(self, t: float) -> None:
        for inst in list(self.instances.values()):
            if inst.due is not None and inst.due <= t and inst.state in (LOADING, WAKING):
                inst.state, inst.ready_at, inst.state_since = READY, inst.due, inst.due
                inst.due = None
                # Idle time counts from readiness, as in the policy's `_last_active`.
                inst.last_used = max(inst.last_used, inst.ready_at)
                self.on_ready(inst)
                queue = self.waiting[inst.model]
                while queue:
                    call = queue.popleft()
                    self.waiting_ids.discard(call.id)
                    self.assign(call, inst)

    # -- batch -----------------------------------------------------------------------------

    def batch_pending(self, model: str) -> int:
        return math.ceil(sum(j.remaining for j in self.queued_jobs[model]) - 1e-9)

    def _submit(self, job: BatchJob) -> None:
        state = JobState(job, float(job.lines))
        self.jobs[job.id] = state
        queue = self.queued_jobs[job.model]
        queue.append(state)
        queue.sort(key=JobState.order)

    def _work_batch(self, t: float) -> None:
        for model, queue in self.queued_jobs.items():
            if not queue:
                continue
            engines = self.of_model(model, READY)
            # Slot-seconds realtime calls leave free this step.
            slots = sum(STEP_SECONDS * max(0, self.concurrency - e.running(t)) for e in engines)
            if slots <= 0:
                continue
            for engine in engines:
                engine.batch_at = t
                engine.last_used = max(engine.last_used, t + STEP_SECONDS)
            used = 0.0
            while queue and used < slots:
                job = queue[0]
                take = min(job.remaining, (slots - used) / job.job.line_seconds)
                job.remaining -= take
                used += take * job.job.line_seconds
                if job.remaining <= 1e-9:
                    job.remaining = 0.0
                    job.finished_at = t + STEP_SECONDS * used / slots
                    queue.pop(0)

    # -- accounting ------------------------------------------------------------------------

    def _account(self, t: float) -> None:
        for inst in self.instances.values():
            gpus = len(inst.gpus) * self.share(inst)
            if inst.state in (LOADING, WAKING):
                kind = "loading"
            elif inst.state == SLEEPING:
                kind = "asleep"
            else:
                inst.prune(t)
                serving = inst.batch_at == t or any(s < t + STEP_SECONDS for s, _, _ in inst.calls)
                kind = "busy" if serving else "idle"
            self.gpu_seconds[kind] += gpus * STEP_SECONDS
            self.gpu_seconds[kind, inst.model] += gpus * STEP_SECONDS

    def _done(self) -> bool:
        return (not self.waiting_ids and not self.instances
                and not any(self.queued_jobs.values()))

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Result:
        calls, jobs = self.trace.calls, self.trace.jobs
        next_call = next_job = 0
        limit = self.trace.duration + TAIL_SECONDS
        t = 0.0
        while t < limit:
            arrived_all = next_call == len(calls) and next_job == len(jobs)
            if arrived_all and self._done():
                break
            self._complete_transitions(t)
            self.on_step(t)
            step_end = t + STEP_SECONDS
            while next_job < len(jobs) and jobs[next_job].submitted < step_end:
                self._submit(jobs[next_job])
                next_job += 1
            while next_call < len(calls) and calls[next_call].arrival < step_end:
                self.route(calls[next_call])
                next_call += 1
            self.after_arrivals(t)
            self._work_batch(t)
            self._account(t)
            self.check_gpus()
            t = step_end
        return Result(
            policy=self.name, key=self.key, trace=self.trace, served=dict(self.served),
            jobs=dict(self.jobs),
            gpu_seconds=Counter(self.gpu_seconds), loads=self.loads, wakes=self.wakes,
            evictions=self.evictions, end=t, capped=t >= limit, notes=Counter(self.notes),
            unserved=len(calls) - len(self.served),
            sleep_after=getattr(self, "sleep_after", None),
        )
