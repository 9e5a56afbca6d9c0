"""The control plane: starts, watches and stops engine instances, and runs the autoscaling loop.

`ensure_running(model)` is what a cold realtime call asks for (through a Celery control task):
it starts at most one instance however often it is called, and waits for readiness. `tick()` is
the periodic loop: under a Redis lock it builds a `Snapshot`, asks `plan` what to do, does it
through the backend and records the decisions with their reasons.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import redis

from runtimes.backends.base import Backend, BackendError, Observed
from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.engines import Engine, engine_for
from runtimes.keepalive import HISTORY_SECONDS, ArrivalHistory
from runtimes.placement import (
    GpuMemory,
    Inventory,
    fits,
    footprint,
    held_memory,
    place_spec,
    with_reservations,
)
from runtimes.policy import MAX_FAILED_STARTS, Action, Snapshot, batch_caps, plan
from runtimes.registry import (
    ARRIVAL_BUCKET_SECONDS,
    DRAINING,
    FAILED,
    LIVE_STATES,
    READY,
    SLEEPING,
    STARTING,
    STOPPING,
    RuntimeRecord,
    RuntimeRegistry,
)
from runtimes.upstreams import check_all as check_upstreams

log = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 0.25
# How long GPUs freed by an eviction stay set aside for the model they were freed for.
RESERVATION_SECONDS = 300.0


class ControlPlane:
    def __init__(
        self,
        catalog: ModelCatalog,
        registry: RuntimeRegistry,
        backend: Backend,
        *,
        default_idle_timeout: float = 600.0,
        start_timeout: float = 1800.0,
        drain_timeout: float = 600.0,
        stop_grace: float = 10.0,
        restart_backoff_base: float = 5.0,
        request_start: Callable[[str, int], None] | None = None,
        gpu_inventory: Inventory | None = None,
        sleep_after_seconds: float | None = None,
        scale_out_waiting: float = 8.0,
        min_lifetime: float = 60.0,
        arrivals_window: float = 300.0,
        batch_pending: Callable[[], dict[str, int]] | None = None,
        batch_per_runtime: int = 64,
        weights=None,
        on_started: Callable[[str, str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        pause: Callable[[float], None] = time.sleep,
        engines: Callable[[ModelSpec], Engine] = engine_for,
        gpu_memory: GpuMemory | None = None,
    ):
        self.catalog = catalog
        self.registry = registry
        # The time, a pause, and the engine of a model: real ones, or a test's fakes.
        self.clock = clock
        self.pause = pause
        self.engines = engines
        self.redis: redis.Redis = registry.redis
        self.backend = backend
        self.default_idle_timeout = default_idle_timeout
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self.stop_grace = stop_grace
        self.restart_backoff_base = restart_backoff_base
        self.gpu_inventory = gpu_inventory or {}
        # GB of each GPU per host: engines share a GPU when they fit (runtimes.placement).
        self.gpu_memory = gpu_memory or {}
        # Each model's arrival buckets, read from the registry as they fill (runtimes.keepalive).
        self.history = ArrivalHistory(bucket_seconds=ARRIVAL_BUCKET_SECONDS)
        self._history_read_to: int | None = None
        # The tick lock this process took and could not give back (Redis went away mid-tick).
        self._unreleased_tick_lock: redis.lock.Lock | None = None
        self.sleep_after_seconds = sleep_after_seconds
        self.scale_out_waiting = scale_out_waiting
        self.min_lifetime = min_lifetime
        self.arrivals_window = arrivals_window
        # Batch lines waiting per model (the batch job store, once there is one).
        self.batch_pending = batch_pending or dict
        self.batch_per_runtime = batch_per_runtime
        # How the tick asks for a start without waiting for it (a Celery task in production).
        self.request_start = request_start or self.ensure_running
        # Told (model, "cold" | "wake", seconds) when an instance became ready: metrics, charts.
        self.on_started = on_started
        # Keeper of model weights (runtimes.weights.ModelWeights): asked before a start claims
        # GPUs, it answers False while the weights are still being downloaded.
        self.weights = weights

    # -- starting ------------------------------------------------------------------------

    def ensure_running(self, model: str, replicas: int = 1) -> RuntimeRecord | None:
        """Make sure `model` has `replicas` live instances; start one (and wait) if it has fewer.

        A cold call asks for 1; the autoscaler asks for more to keep `min_replicas` or to scale
        a busy model out. One call starts at most one instance.
        """
        spec = self.catalog.get(model)
        if spec is None:
            log.warning("ensure_running: %s is not in the catalog", model)
            return None
        if spec.upstream_url is not None:
            return None  # not ours to start (runtimes.upstreams)
        # A start asked for before the model's last failure may arrive after it: the failure
        # count, not the asking, decides.
        if self.registry.failed_starts().get(model, 0) >= MAX_FAILED_STARTS:
            log.info("not starting %s: failed %d times in a row, waiting for a reset", model,
                     MAX_FAILED_STARTS)
            return None
        asleep = [r for r in self.registry.for_model(model) if r.state == SLEEPING]
        if asleep and not any(r.state in (READY, STARTING) for r in self.registry.for_model(model)):
            if not self._claim_wake(spec, asleep[0]):
                return None  # its memory is taken: the autoscaler makes room, or not
            return self.wake(asleep[0].id)
        if self.weights is not None and not self.weights.prepare_for_start(spec):
            return None  # asked again by the download's end or the next tick
        record = self._claim_start(spec, min(max(replicas, 1), spec.max_replicas))
        if record is None:
            return None
        return self._launch_and_wait(spec, record)

    def _claim_start(self, spec: ModelSpec, replicas: int) -> RuntimeRecord | None:
        """Create a `starting` record on free GPUs, unless the model has `replicas` live ones.

        One lock for all placements: two models starting at once never get the same GPU.
        """
        lock = self.redis.lock(self.registry.key("lock", "placement"), timeout=30,
                               blocking_timeout=10)
        if not lock.acquire():
            return None
        try:
            records = self.registry.all()
            live = [r for r in records if r.model == spec.id
                    and r.state in LIVE_STATES and r.state != DRAINING]
            if len(live) >= replicas:
                return None
            meta = {}
            if self.gpu_inventory:
                spot = place_spec(spec, self.gpu_inventory, self.gpu_memory,
                                  self._taken(records, spec.id))
                if spot is None:
                    log.info("no room for %s yet: the autoscaler will make room", spec.id)
                    return None
                gpu_host, gpus = spot
                self.registry.release_reservation(spec.id)
                # Its share of each GPU, so engines side by side stay within the GPU.
                fraction = footprint(spec, self.gpu_memory.get(gpu_host)).fraction
                if gpus and fraction is not None:
                    meta["memory_fraction"] = fraction
            else:
                gpu_host, gpus = "local", ()
            now = self.clock()
            record = RuntimeRecord(
                id=f"rt-{uuid.uuid4().hex[:12]}",
                model=spec.id,
                engine=spec.engine,
                backend=self.backend.name,
                state=STARTING,
                host="",
                port=0,
                fingerprint=spec.fingerprint,
                gpus=gpus,
                gpu_host=gpu_host,
                created_at=now,
                state_since=now,
                reason="cold start",
                meta=meta,
            )
            self.registry.create(record)
            return record
        finally:
            lock.release()

    def _taken(self, records: list[RuntimeRecord], model: str):
        """Memory held on each GPU, plus what is set aside for other models."""
        catalog = {s.id: s for s in self.catalog}
        return with_reservations(held_memory(records, catalog, self.gpu_memory),
                                 self.registry.reservations(), model, catalog, self.gpu_memory)

    def _claim_wake(self, spec: ModelSpec, asleep: RuntimeRecord) -> bool:
        """Whether the asleep instance's memory is free again, claimed under the placement
        lock (marked waking, it counts as awake for every placement from now on)."""
        fp = footprint(spec, self.gpu_memory.get(asleep.gpu_host))
        if not self.gpu_inventory or fp.whole:
            return True  # it kept its GPUs whole while asleep
        lock = self.redis.lock(self.registry.key("lock", "placement"), timeout=30,
                               blocking_timeout=10)
        if not lock.acquire():
            return False
        try:
            records = self.registry.all()
            taken = self._taken(records, spec.id).get(asleep.gpu_host, {})
            memory = self.gpu_memory.get(asleep.gpu_host)
            if not all(fits(max(0.0, taken.get(g, 0.0) - fp.asleep), fp.awake, memory)
                       for g in asleep.gpus):
                log.info("no room to wake %s yet: the autoscaler will make room", asleep.id)
                return False
            claimed = self.registry.transition(
                asleep.id, (SLEEPING,), meta={**asleep.meta, "waking": self.clock()})
            if claimed is not None:
                self.registry.release_reservation(spec.id)
            return claimed is not None
        finally:
            lock.release()

    def _launch_and_wait(self, spec: ModelSpec, record: RuntimeRecord) -> RuntimeRecord | None:
        engine = self.engines(spec)
        try:
            fraction = record.meta.get("memory_fraction")
            # Given only when the engine shares its GPUs (a backend need not know of it else).
            extra = {"memory_fraction": fraction} if fraction is not None else {}
            started = self.backend.start(record.id, spec, engine, record.gpus, record.gpu_host,
                                         **extra)
        except BackendError as exc:
            return self._fail(record, None, str(exc))
        record = self.registry.transition(
            record.id, (STARTING,), host=started.host, port=started.port, handle=started.handle,
            state=STARTING,
        )
        if record is None:  # stopped by someone else meanwhile
            return None
        deadline = record.created_at + (spec.start_timeout_seconds or self.start_timeout)
        while self.clock() < deadline:
            if engine.probe(record.endpoint, spec.id):
                return self._mark_ready(spec, record)
            inst = self._observe(record.handle)
            if inst is None or not inst.running:
                code = inst.exit_code if inst else None
                return self._fail(record, code, f"engine exited with code {code} while starting")
            current = self.registry.get(record.id)
            if current is None or current.state != STARTING:
                return current
            self.pause(PROBE_INTERVAL_SECONDS)
        self._stop_quietly(record)
        return self._fail(record, None, f"not ready within {deadline - record.created_at:.0f} s")

    def _mark_ready(self, spec: ModelSpec, record: RuntimeRecord) -> RuntimeRecord | None:
        now = self.clock()
        ready = self.registry.transition(record.id, (STARTING,), state=READY, ready_at=now,
                                         reason="readiness probe passed")
        if ready is not None:
            if record.reason != "adopted":  # an adopted instance's load time is unknown
                self.registry.record_start_duration(spec.id, now - record.created_at)
                if self.on_started is not None:
                    self.on_started(spec.id, "cold", now - record.created_at)
            self.registry.note_good_start(spec.id)
            self.registry.clear_demand(spec.id)
            log.info("%s ready for %s after %.1f s", record.id, spec.id, now - record.created_at)
        return ready

    def _observe(self, handle: str) -> Observed | None:
        for inst in self.backend.list():
            if inst.handle == handle:
                return inst
        return None

    def _fail(self, record: RuntimeRecord, exit_code: int | None, reason: str):
        logs = self.backend.logs(record.handle or record.id, tail=40) if record.handle else ""
        # The start task and the tick may both see the same engine die: only the one that moves
        # the record to `failed` counts the failure.
        if self.registry.transition(record.id, LIVE_STATES, state=FAILED, exit_code=exit_code,
                                    last_logs=logs, reason=reason) is None:
            return None
        count = self.registry.note_failed_start(record.model, {
            "instance": record.id, "exit_code": exit_code, "reason": reason,
            "last_logs": logs, "at": self.clock(),
        })
        log.error("%s for %s failed (%d in a row): %s", record.id, record.model, count, reason)
        self.registry.record_decisions([{
            "at": self.clock(), "action": "mark_failed", "model": record.model,
            "instance": record.id, "reason": reason,
        }])
        return None

    # -- sleep mode ----------------------------------------------------------------------

    def sleep(self, instance_id: str, reason: str) -> RuntimeRecord | None:
        """Put a ready engine to sleep, or a drained one an eviction wants asleep."""
        record = self.registry.get(instance_id)
        spec = self.catalog.get(record.model) if record else None
        if record is None or spec is None or record.state not in (READY, DRAINING):
            return None
        if not self.engines(spec).sleep(record.endpoint):
            log.warning("%s would not sleep; leaving it awake", instance_id)
            return None
        meta = {k: v for k, v in record.meta.items() if k not in ("waking", "then")}
        return self.registry.transition(instance_id, (READY, DRAINING), state=SLEEPING,
                                        reason=reason, meta=meta)

    def wake(self, instance_id: str) -> RuntimeRecord | None:
        record = self.registry.get(instance_id)
        spec = self.catalog.get(record.model) if record else None
        if record is None or spec is None or record.state != SLEEPING:
            return None
        started = self.clock()
        if not self.engines(spec).wake(record.endpoint):
            log.warning("%s did not wake; stopping it for a fresh start", instance_id)
            self.stop_instance(instance_id, "failed to wake up")
            return None
        now = self.clock()
        meta = {k: v for k, v in record.meta.items() if k != "waking"}
        woken = self.registry.transition(instance_id, (SLEEPING,), state=READY, ready_at=now,
                                         reason="woken up", meta=meta)
        if woken is not None:
            self.registry.record_start_duration(spec.id, now - started, kind="wake")
            if self.on_started is not None:
                self.on_started(spec.id, "wake", now - started)
            self.registry.clear_demand(spec.id)
        return woken

    # -- stopping ------------------------------------------------------------------------

    def stop_instance(self, instance_id: str, reason: str) -> None:
        record = self.registry.transition(instance_id, None, state=STOPPING, reason=reason)
        handle = record.handle if record is not None and record.handle else instance_id
        self._stop_quietly_handle(handle)
        self.registry.remove(instance_id)

    def _stop_quietly(self, record: RuntimeRecord) -> None:
        if record.handle:
            self._stop_quietly_handle(record.handle)

    def _stop_quietly_handle(self, handle: str) -> None:
        try:
            self.backend.stop(handle, grace=self.stop_grace)
        except BackendError as exc:
            log.error("stopping %s: %s", handle, exc)

    def stop_all(self, reason: str = "orchestrator shutting down") -> int:
        """Stop every instance the backend runs for us; return how many."""
        handles = {inst.handle: inst.instance_id for inst in self.backend.list()}
        for record in self.registry.all():
            handles.setdefault(record.handle or record.id, record.id)
        for handle, instance_id in handles.items():
            self._stop_quietly_handle(handle)
            self.registry.remove(instance_id)
        return len(handles)

    # -- the loop ------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> Snapshot:
        now = self.clock() if now is None else now
        records = self.registry.all()
        failures = self.registry.failed_starts()
        last_failure_at = {}
        for model in failures:
            details = self.registry.last_failure(model) or {}
            last_failure_at[model] = float(details.get("at", 0.0))
        demand, pending = self.registry.demand(), self.batch_pending()
        return Snapshot(
            now=now,
            # Upstreams are never started, stopped or placed: the policy does not see them.
            catalog={spec.id: spec for spec in self.catalog if spec.upstream_url is None},
            runtimes=records,
            observed=self.backend.list(),
            demand=demand,
            last_used=self.registry.last_used(),
            inflight=self.registry.inflight([r.id for r in records], now),
            failed_starts=failures,
            last_failure_at=last_failure_at,
            default_idle_timeout=self.default_idle_timeout,
            drain_timeout=self.drain_timeout,
            restart_backoff_base=self.restart_backoff_base,
            gpu_inventory=self.gpu_inventory,
            arrivals=self.registry.arrivals(self.arrivals_window, now),
            batch_pending=pending,
            engine_load=self._engine_load(records),
            can_sleep=frozenset(s.id for s in self.catalog if self.engines(s).can_sleep(s)),
            sleep_after_seconds=self.sleep_after_seconds,
            scale_out_waiting=self.scale_out_waiting,
            min_lifetime=self.min_lifetime,
            reservations=self.registry.reservations(now),
            **self.weights_not_ready(records, {*demand, *pending}),
            gpu_memory=self.gpu_memory,
            arrivals_window=self.arrivals_window,
            demand_since=self.registry.demand_since(),
            history=self._call_history(now),
            start_seconds=self._medians("cold"),
            wake_seconds=self._medians("wake"),
        )

    def _call_history(self, now: float):
        """Each model's idle periods, from the arrival buckets read since the last pass (all of
        the history's span at the first); the current bucket is read again as it fills."""
        last = int(now // ARRIVAL_BUCKET_SECONDS)
        first = self._history_read_to
        if first is None:
            first = last - int(HISTORY_SECONDS // ARRIVAL_BUCKET_SECONDS)
        for bucket, counts in self.registry.arrival_buckets(first, last).items():
            for model in counts:
                self.history.add(model, bucket)
        self._history_read_to = last
        return self.history.snapshot(now)

    def _medians(self, kind: str) -> dict[str, float]:
        """Median observed start (or wake-up) seconds per model, where any were observed."""
        medians = {}
        for spec in self.catalog:
            seconds = self.registry.median_start_seconds(spec.id, kind=kind)
            if seconds is not None:
                medians[spec.id] = seconds
        return medians

    def weights_not_ready(self, records: list[RuntimeRecord],
                           asked: set[str]) -> dict[str, frozenset[str]]:
        """The snapshot's `weights_missing` and `downloading`, for the models that download
        their weights, have no live engine (one that has, has its weights) and may be wanted
        (realtime or batch demand, or `min_replicas`)."""
        if self.weights is None:
            return {}
        live = {r.model for r in records if r.state in LIVE_STATES}
        missing, downloading = set(), set()
        for spec in self.catalog:
            if (not spec.download_weights or spec.id in live
                    or (spec.id not in asked and not spec.min_replicas)):
                continue
            if self.weights.downloads.tracker.active(spec.repo_id, spec.revision):
                missing.add(spec.id)
                downloading.add(spec.id)
            elif not self.weights.disk.is_local(spec):
                missing.add(spec.id)
        return {"weights_missing": frozenset(missing), "downloading": frozenset(downloading)}

    def _engine_load(self, records: list[RuntimeRecord]):
        loads = {}
        for record in records:
            spec = self.catalog.get(record.model)
            if record.state == READY and spec is not None:
                load = self.engines(spec).load(record.endpoint)
                if load is not None:
                    loads[record.id] = load
        return loads

    def tick(self, lock_seconds: float = 60.0) -> list[dict] | None:
        """One pass of the loop; None when another tick holds the lock."""
        self._release_unreleased_tick_lock()
        # Not thread-local: a later tick, in another thread, may have to release it.
        lock = self.redis.lock(self.registry.key("lock", "tick"), timeout=lock_seconds,
                               blocking=False, thread_local=False)
        if not lock.acquire():
            return None
        try:
            snapshot = self.snapshot()
            actions = plan(snapshot)
            decisions = []
            for action in actions:
                self._carry_out(action)
                decisions.append({"at": snapshot.now, **action.describe()})
            self._probe_starting()
            check_upstreams(self.catalog, self.registry)
            if self.weights is not None:
                self.weights.pages.refresh_residency()  # for the web's cache and prime views
            self.registry.set_batch_caps(
                batch_caps(snapshot, self.registry.batch_caps(), self.batch_per_runtime)
            )
            # "forget" of a failure already recorded is bookkeeping, not a decision worth showing.
            self.registry.record_decisions([d for d in decisions if d["action"] != "forget"])
            return decisions
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("tick outlived its lock (%.0f s)", lock_seconds)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting or failing over: the lock key may live on (AOF, a replica).
                # The next tick gives it back, so ticks do not skip until its timeout.
                log.warning("tick lock not released, will retry: %s", exc)
                self._unreleased_tick_lock = lock

    def _release_unreleased_tick_lock(self) -> None:
        lock, self._unreleased_tick_lock = self._unreleased_tick_lock, None
        if lock is None:
            return
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # it expired meanwhile (and another tick may hold the key now)
        except (redis.ConnectionError, redis.TimeoutError):
            self._unreleased_tick_lock = lock

    def _reserve_for(self, action: Action, victim: RuntimeRecord | None) -> None:
        if action.evicted_for and victim is not None and victim.gpus:
            self.registry.reserve(action.evicted_for, victim.gpu_host, victim.gpus,
                                  RESERVATION_SECONDS)

    def _probe_starting(self) -> None:
        """Mark ready the starting instances nobody waits for (adopted, or their task died)."""
        for record in self.registry.all():
            spec = self.catalog.get(record.model)
            if record.state == STARTING and record.port and spec is not None:
                if self.engines(spec).probe(record.endpoint, spec.id, timeout=1.0):
                    self._mark_ready(spec, record)

    def _carry_out(self, action: Action) -> None:
        log.info("%s %s %s: %s", action.kind, action.model, action.instance_id, action.reason)
        if action.kind == "start":
            self.request_start(action.model, action.replicas)
        elif action.kind == "wake":
            self.request_start(action.model, 1)  # ensure_running wakes a sleeping instance
        elif action.kind == "sleep":
            record = self.sleep(action.instance_id, action.reason)
            self._reserve_for(action, record)  # an eviction that keeps the engine's context
        elif action.kind == "drain":
            record = self.registry.transition(action.instance_id, (READY,), state=DRAINING,
                                              reason=action.reason,
                                              meta={"evicted_for": action.evicted_for,
                                                    "then": action.then})
            self._reserve_for(action, record)
        elif action.kind == "stop":
            self._reserve_for(action, self.registry.get(action.instance_id))
            self.stop_instance(action.instance_id, action.reason)
        elif action.kind == "mark_failed":
            record = self.registry.get(action.instance_id)
            if record is not None:
                self._fail(record, action.exit_code, action.reason)
        elif action.kind == "forget":
            self.registry.remove(action.instance_id)
        elif action.kind == "adopt":
            inst = action.observed
            now = self.clock()
            self.registry.create(RuntimeRecord(
                id=inst.instance_id, model=inst.model, engine=inst.engine,
                backend=self.backend.name, state=STARTING, host=inst.host, port=inst.port,
                handle=inst.handle, gpus=inst.gpus, gpu_host=inst.gpu_host,
                fingerprint=inst.fingerprint, created_at=inst.started_at or now,
                state_since=now, reason="adopted",
            ))
