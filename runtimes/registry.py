"""The runtime registry: the state of every engine instance, kept in Redis.

An instance moves stopped → starting → ready → draining → stopped, or to failed; "stopped" means
the record is gone. Alongside the records the registry keeps what the autoscaler needs to know
about use: demand for models with no ready instance, the last use and calls in flight per
instance (reported by the web workers), arrivals per model in 10-second buckets, observed start
durations per model, consecutive failed starts and recent decisions.

All writes of a record go through `transition`, a compare-and-set on the state, so two control
workers can never both start or both stop the same instance; a move the `TRANSITIONS` table does
not allow is refused (as llama-swap's `isValidTransition` does).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

import redis

log = logging.getLogger(__name__)


class RuntimeState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


STARTING = RuntimeState.STARTING
READY = RuntimeState.READY
SLEEPING = RuntimeState.SLEEPING
DRAINING = RuntimeState.DRAINING
STOPPING = RuntimeState.STOPPING
FAILED = RuntimeState.FAILED
STATES = tuple(RuntimeState)
# The moves an instance may make (staying in a state, to update its fields, is always allowed).
# Any state may be stopped; only a start reaches ready, only a wake leaves sleep, and nothing
# comes back from draining, stopping or failed: such an instance is stopped and a new one
# started. "Stopped" is the record removed.
TRANSITIONS: dict[RuntimeState, frozenset[RuntimeState]] = {
    STARTING: frozenset({READY, STOPPING, FAILED}),
    READY: frozenset({SLEEPING, DRAINING, STOPPING, FAILED}),
    SLEEPING: frozenset({READY, STOPPING, FAILED}),
    # A drain made to put an engine to sleep (an eviction that keeps its context) ends asleep.
    DRAINING: frozenset({SLEEPING, STOPPING, FAILED}),
    STOPPING: frozenset({FAILED}),
    FAILED: frozenset({STOPPING}),
}


def allowed_move(current: str, new: str) -> bool:
    return current == new or RuntimeState(new) in TRANSITIONS[RuntimeState(current)]
# States in which an instance holds its GPUs and a port.
LIVE_STATES = (STARTING, READY, SLEEPING, DRAINING, STOPPING)

ARRIVAL_BUCKET_SECONDS = 10
# Arrival buckets are kept this long: the autoscaler's keep-alive reads each model's idle periods
# over the last 4 hours from them (runtimes.keepalive.HISTORY_SECONDS).
ARRIVAL_BUCKETS_KEPT_SECONDS = 5 * 3600

# KEYS[1] = demand hash, KEYS[2] = demand-since hash; ARGV = model, time it was served, ...
# Drops demand no newer than that.
_CLEAR_SERVED_DEMAND = """
for i = 1, #ARGV, 2 do
  local wanted = redis.call('HGET', KEYS[1], ARGV[i])
  if wanted and tonumber(wanted) <= tonumber(ARGV[i + 1]) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
"""
WORKER_STALE_SECONDS = 10.0


@dataclass(frozen=True)
class RuntimeRecord:
    id: str
    model: str
    engine: str
    backend: str
    state: str
    host: str
    port: int
    handle: str = ""
    gpus: tuple[int, ...] = ()
    gpu_host: str = "local"
    fingerprint: str = ""
    created_at: float = 0.0
    state_since: float = 0.0
    ready_at: float | None = None
    exit_code: int | None = None
    last_logs: str = ""
    reason: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> RuntimeRecord:
        data = json.loads(text)
        data["gpus"] = tuple(data.get("gpus") or ())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class RuntimeRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "gw"):
        self.redis = client
        self.prefix = prefix
        self._records_key = f"{prefix}:runtimes"
        self._clear_served_demand = client.register_script(_CLEAR_SERVED_DEMAND)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- records ---------------------------------------------------------------------------

    def all(self) -> list[RuntimeRecord]:
        return [RuntimeRecord.from_json(v) for v in self.redis.hvals(self._records_key)]

    def get(self, instance_id: str) -> RuntimeRecord | None:
        raw = self.redis.hget(self._records_key, instance_id)
        return RuntimeRecord.from_json(raw) if raw else None

    def for_model(self, model: str) -> list[RuntimeRecord]:
        return [r for r in self.all() if r.model == model]

    def create(self, record: RuntimeRecord) -> bool:
        """Add a new record; False if one with that id exists."""
        return bool(self.redis.hsetnx(self._records_key, record.id, record.to_json()))

    def transition(
        self, instance_id: str, from_states: tuple[str, ...] | None, **changes
    ) -> RuntimeRecord | None:
        """Change a record if its state is one of `from_states` (None: any) and the table allows
        the move; return the new record, or None."""
        if "state" in changes and "state_since" not in changes:
            changes["state_since"] = time.time()
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._records_key)
                    raw = pipe.hget(self._records_key, instance_id)
                    if raw is None:
                        pipe.reset()
                        return None
                    current = RuntimeRecord.from_json(raw)
                    if from_states is not None and current.state not in from_states:
                        pipe.reset()
                        return None
                    if "state" in changes and not allowed_move(current.state, changes["state"]):
                        pipe.reset()
                        log.warning("%s: refused the move %s -> %s", instance_id,
                                    current.state, changes["state"])
                        return None
                    updated = replace(current, **changes)
                    pipe.multi()
                    pipe.hset(self._records_key, instance_id, updated.to_json())
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def remove(self, instance_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hdel(self._records_key, instance_id)
        pipe.hdel(self.key("last_used"), instance_id)
        pipe.delete(self.key("inflight", instance_id))
        pipe.delete(self.key("lora", instance_id))  # the adapters it had (runtimes.lora)
        pipe.execute()

    # -- start timings ---------------------------------------------------------------------

    def record_start_duration(self, model: str, seconds: float, kind: str = "cold") -> None:
        key = self.key("starts", kind, model)
        pipe = self.redis.pipeline()
        pipe.lpush(key, f"{seconds:.3f}")
        pipe.ltrim(key, 0, 9)
        pipe.execute()

    def start_durations(self, model: str, kind: str = "cold") -> list[float]:
        return [float(v) for v in self.redis.lrange(self.key("starts", kind, model), 0, -1)]

    def median_start_seconds(self, model: str, kind: str = "cold") -> float | None:
        durations = self.start_durations(model, kind)
        return statistics.median(durations) if durations else None

    # -- demand and use --------------------------------------------------------------------

    def note_demand(self, model: str, now: float | None = None) -> None:
        """A call found no ready engine: the last such time, and the first since the demand was
        last met (how long its callers have waited, for eviction by value)."""
        at = f"{time.time() if now is None else now:.3f}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key("demand"), model, at)
        pipe.hsetnx(self.key("demand_since"), model, at)
        pipe.execute()

    def demand(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.key("demand")).items()}

    def demand_since(self) -> dict[str, float]:
        raw = self.redis.hgetall(self.key("demand_since"))
        return {k.decode(): float(v) for k, v in raw.items()}

    def clear_demand(self, model: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.key("demand"), model)
        pipe.hdel(self.key("demand_since"), model)
        pipe.execute()

    def report_usage(
        self,
        worker: str,
        last_used: dict[str, float],
        inflight: dict[str, int],
        arrivals: dict[str, int],
        now: float | None = None,
        served: dict[str, float] | None = None,
        extra: Callable[[object], None] | None = None,
    ) -> None:
        """One web worker's use since its last report, written in one round trip (with what
        `extra(pipe)` adds to it: the calls' token usage).

        `served` (model -> when it last answered a call) ends the demand noted before then: a
        cold call answered 503 from a route cache a moment stale must not keep the model
        "wanted" after its engine is serving.
        """
        now = time.time() if now is None else now
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key("workers"), worker, f"{now:.3f}")
        if last_used:
            pipe.hset(self.key("last_used"), mapping={k: f"{v:.3f}" for k, v in last_used.items()})
        for instance_id, count in inflight.items():
            pipe.hset(self.key("inflight", instance_id), worker, count)
            pipe.expire(self.key("inflight", instance_id), 3600)
        if arrivals:
            bucket = self.key("arrivals", str(int(now // ARRIVAL_BUCKET_SECONDS)))
            for model, count in arrivals.items():
                pipe.hincrby(bucket, model, count)
            pipe.expire(bucket, ARRIVAL_BUCKETS_KEPT_SECONDS)
        if served:
            args = [v for model, at in served.items() for v in (model, f"{at:.3f}")]
            self._clear_served_demand(keys=[self.key("demand"), self.key("demand_since")],
                                      args=args, client=pipe)
        if extra is not None:
            extra(pipe)
        pipe.execute()

    def last_used(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.key("last_used")).items()}

    def web_workers(self) -> dict[str, float]:
        """When each web worker last reported its usage, by worker id."""
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.key("workers")).items()}

    def inflight(self, instance_ids: list[str], now: float | None = None) -> dict[str, int]:
        """Calls in flight per instance, counting only workers that reported recently."""
        now = time.time() if now is None else now
        workers = self.web_workers()
        live = {w for w, seen in workers.items() if now - seen < WORKER_STALE_SECONDS}
        pipe = self.redis.pipeline(transaction=False)
        for instance_id in instance_ids:
            pipe.hgetall(self.key("inflight", instance_id))
        totals = {}
        for instance_id, counts in zip(instance_ids, pipe.execute(), strict=True):
            totals[instance_id] = sum(
                int(v) for w, v in counts.items() if w.decode() in live and int(v) > 0
            )
        return totals

    def arrivals(self, seconds: float, now: float | None = None) -> dict[str, int]:
        """Realtime arrivals per model over the last `seconds`."""
        now = time.time() if now is None else now
        last = int(now // ARRIVAL_BUCKET_SECONDS)
        first = int((now - seconds) // ARRIVAL_BUCKET_SECONDS) + 1
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(first, last + 1):
            pipe.hgetall(self.key("arrivals", str(bucket)))
        totals: dict[str, int] = {}
        for counts in pipe.execute():
            for model, value in counts.items():
                totals[model.decode()] = totals.get(model.decode(), 0) + int(value)
        return totals

    def arrival_buckets(self, first: int, last: int) -> dict[int, dict[str, int]]:
        """Realtime arrivals per model in each 10-second bucket from `first` to `last`
        (bucket = time // ARRIVAL_BUCKET_SECONDS); empty buckets left out."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(first, last + 1):
            pipe.hgetall(self.key("arrivals", str(bucket)))
        return {bucket: {k.decode(): int(v) for k, v in counts.items()}
                for bucket, counts in zip(range(first, last + 1), pipe.execute(), strict=True)
                if counts}

    def claim_start_request(self, model: str, ttl: float) -> bool:
        """True for the first caller to ask for a start of `model` until it is done or `ttl`."""
        return bool(self.redis.set(self.key("ensure", model), "1", nx=True, ex=max(1, int(ttl))))

    def release_start_request(self, model: str) -> None:
        self.redis.delete(self.key("ensure", model))

    def reserve(self, model: str, gpu_host: str, gpus: tuple[int, ...], seconds: float) -> None:
        """Set GPUs aside for `model` for a while: an eviction made room for it."""
        self.redis.hset(self.key("reservations"), model, json.dumps(
            {"host": gpu_host, "gpus": list(gpus), "until": time.time() + seconds}))

    def reservations(self, now: float | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        now = time.time() if now is None else now
        held = {}
        for model, raw in self.redis.hgetall(self.key("reservations")).items():
            entry = json.loads(raw)
            if entry["until"] > now:
                held[model.decode()] = (entry["host"], tuple(entry["gpus"]))
        return held

    def release_reservation(self, model: str) -> None:
        self.redis.hdel(self.key("reservations"), model)

    def batch_caps(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.key("batch_caps")).items()}

    def set_batch_caps(self, caps: dict[str, int]) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self.key("batch_caps"))
        if caps:
            pipe.hset(self.key("batch_caps"), mapping=caps)
        pipe.execute()

    # -- failures and decisions ------------------------------------------------------------

    def note_failed_start(self, model: str, details: dict) -> int:
        pipe = self.redis.pipeline()
        pipe.hincrby(self.key("failed_starts"), model, 1)
        pipe.hset(self.key("last_failure"), model, json.dumps(details))
        count, _ = pipe.execute()
        return int(count)

    def note_good_start(self, model: str) -> None:
        self.redis.hdel(self.key("failed_starts"), model)

    def failed_starts(self) -> dict[str, int]:
        return {
            k.decode(): int(v) for k, v in self.redis.hgetall(self.key("failed_starts")).items()
        }

    def last_failure(self, model: str) -> dict | None:
        raw = self.redis.hget(self.key("last_failure"), model)
        return json.loads(raw) if raw else None

    def reset_model(self, model: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hdel(self.key("failed_starts"), model)
        pipe.hdel(self.key("last_failure"), model)
        pipe.execute()

    def record_decisions(self, decisions: list[dict]) -> None:
        if not decisions:
            return
        pipe = self.redis.pipeline()
        for decision in decisions:
            pipe.lpush(self.key("decisions"), json.dumps(decision))
        pipe.ltrim(self.key("decisions"), 0, 499)
        pipe.execute()

    def recent_decisions(self, count: int = 50) -> list[dict]:
        return [json.loads(v) for v in self.redis.lrange(self.key("decisions"), 0, count - 1)]
