"""The autoscaling policy's view of the world: its input (`Snapshot`), its output (`Action`),
and what a snapshot says of one model: its recent rate of calls, how long it takes to start or
wake, whether its idle engines sleep, and its keep-alive windows (`runtimes.keepalive`).

Pure, like the policy (`runtimes.policy`), and shared with its eviction rules
(`runtimes.eviction`), so that both read the snapshot the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtimes.backends.base import Observed
from runtimes.catalog import ModelSpec
from runtimes.engines import EngineLoad
from runtimes.keepalive import HEAD_MARGIN, CallHistory, KeepAlive, keep_alive
from runtimes.placement import (
    Footprint,
    GpuMemory,
    Held,
    Inventory,
    fits,
    footprint,
    release,
)
from runtimes.registry import READY, RuntimeRecord

# A model whose starts failed this many times in a row is left alone until an operator resets it.
MAX_FAILED_STARTS = 3
# Unmet demand older than this no longer asks for a start. The control plane clears a model's
# demand once it is ready, so this only ends the wish of callers who gave up; it must outlast
# the longest Retry-After, or a caller told to come back in 3 minutes is forgotten meanwhile.
DEMAND_WINDOW_SECONDS = 600.0
# A starting record the backend does not show yet, or shows made but not yet run (a container
# between create and start), may be mid-launch; give it this long.
LAUNCH_GRACE_SECONDS = 30.0
# Before a model's start or wake-up has been measured, and with no catalog figure.
DEFAULT_START_SECONDS = 120.0
DEFAULT_WAKE_SECONDS = 2.0
# A pre-warm wakes the engine this much earlier than its wake-up time: a tick, and the arrival
# buckets' resolution.
PREWARM_MARGIN_SECONDS = 10.0

# Why a start (or wake) is wanted, most urgent first.
REALTIME, MIN_REPLICAS, SCALE_OUT, BATCH = "realtime", "min_replicas", "scale_out", "batch"
PREWARM = "prewarm"
URGENCY = {REALTIME: 0, MIN_REPLICAS: 1, SCALE_OUT: 2, BATCH: 3, PREWARM: 4}


@dataclass(frozen=True)
class Action:
    kind: str  # start | wake | sleep | drain | stop | mark_failed | adopt | forget
    reason: str
    model: str = ""
    instance_id: str = ""
    exit_code: int | None = None
    observed: Observed | None = None
    replicas: int = 1  # with start: how many live instances the model should then have
    evicted_for: str = ""  # with drain/stop/sleep: the model whose start needs the memory
    then: str = ""  # with drain: "sleep" or "stop" once no call is in flight (default stop)

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
    # GB of each GPU per host (nvidia-smi, GPU_MEMORY_GB, DOCKER_HOSTS); a host missing: its
    # engines take their GPUs whole.
    gpu_memory: GpuMemory = field(default_factory=dict)
    # The window `arrivals` counts over, seconds: arrivals / window is a model's recent rate.
    arrivals_window: float = 300.0
    # When each model's unmet demand began (the first call that found no ready engine).
    demand_since: dict[str, float] = field(default_factory=dict)
    # Each model's idle periods and last call (runtimes.keepalive).
    history: dict[str, CallHistory] = field(default_factory=dict)
    # Seconds a cold start and a wake-up take per model (observed, else the catalog's figure).
    start_seconds: dict[str, float] = field(default_factory=dict)
    wake_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Want:
    """A start (or, with `wake`, a wake-up of that asleep instance) the policy would make."""

    kind: str
    model: str
    reason: str
    replicas: int = 1
    wake: RuntimeRecord | None = None


def wanted_since(snapshot: Snapshot, wanted_at: float | None, since: float) -> bool:
    """Whether a realtime call asked for the model after `since` (and not too long ago)."""
    return (wanted_at is not None and wanted_at >= since
            and snapshot.now - wanted_at < DEMAND_WINDOW_SECONDS)


def last_active(snapshot: Snapshot, record: RuntimeRecord) -> float:
    """When the instance last served anything; a fresh one counts from when it became ready."""
    return max(snapshot.last_used.get(record.id, 0.0), record.ready_at or record.state_since)


# -- what the policy knows of a model: its rate, its start and wake times, its keep-alive -------


def call_rate(snapshot: Snapshot, model: str) -> float:
    """Recent realtime calls per second."""
    return snapshot.arrivals.get(model, 0) / max(1.0, snapshot.arrivals_window)


# A rate at which the model's silence since its last call would have had under 5 % chance
# (e^-3) is not believed: its demand has ended, or paused, whatever the recent count says.
SILENCE_CALLS = 3.0


def predicted_rate(snapshot: Snapshot, model: str) -> float:
    """Calls per second to expect from now: the recent rate, unless the silence since the
    model's last call rules it out (a burst that has just ended)."""
    rate = call_rate(snapshot, model)
    history = snapshot.history.get(model)
    if history is not None and history.last_call is not None:
        silence = snapshot.now - history.last_call
        if silence > 0:
            rate = min(rate, SILENCE_CALLS / silence)
    return rate


def start_estimate(snapshot: Snapshot, model: str) -> float:
    """Seconds a cold start of `model` takes: observed, else the catalog's, else a default."""
    spec = snapshot.catalog.get(model)
    return (snapshot.start_seconds.get(model)
            or (spec.expected_start_seconds if spec else None) or DEFAULT_START_SECONDS)


def wake_estimate(snapshot: Snapshot, model: str) -> float:
    """Seconds a wake-up of `model` takes: observed, else vLLM's usual."""
    return snapshot.wake_seconds.get(model) or DEFAULT_WAKE_SECONDS


def sleeps(snapshot: Snapshot, spec: ModelSpec) -> bool:
    """Whether idle engines of `spec` are put to sleep (the engine can, and sleep is on)."""
    after = spec.sleep_after_seconds
    return spec.id in snapshot.can_sleep and (after is not None
                                              or snapshot.sleep_after_seconds is not None)


def keep_alive_for(snapshot: Snapshot, spec: ModelSpec) -> KeepAlive:
    """How long idle engines of `spec` stay awake and live, from its history (see
    `runtimes.keepalive`); the catalog entry's own figures win, the settings fill in."""
    history = snapshot.history.get(spec.id)
    idle_timeout = spec.idle_timeout_seconds or snapshot.default_idle_timeout
    if sleeps(snapshot, spec):
        after = spec.sleep_after_seconds
        default = after if after is not None else snapshot.sleep_after_seconds
        return keep_alive(history, default_awake=default, default_stop=idle_timeout,
                          fixed_awake=after, fixed_stop=spec.idle_timeout_seconds)
    keep = keep_alive(history, default_awake=idle_timeout, default_stop=idle_timeout,
                      fixed_stop=spec.idle_timeout_seconds)
    # Awake until stopped, and a stop costs a cold start: the history may keep it longer than
    # the idle timeout, never shorter.
    stop = keep.stop if spec.idle_timeout_seconds else max(keep.stop, idle_timeout)
    return KeepAlive(stop, stop, basis=keep.basis)


def prewarm_lead(snapshot: Snapshot, model: str) -> float:
    return wake_estimate(snapshot, model) + PREWARM_MARGIN_SECONDS


def prewarmed(snapshot: Snapshot, record: RuntimeRecord, keep: KeepAlive) -> bool:
    """Woken ahead of a call its history predicts, which has not come yet (and may still)."""
    history = snapshot.history.get(record.model)
    if (keep.prewarm is None or history is None or history.last_call is None
            or record.state != READY or record.ready_at is None):
        return False
    due = history.last_call + keep.prewarm - prewarm_lead(snapshot, record.model)
    return record.ready_at >= due and snapshot.now - history.last_call < keep.warm_until


def prewarm_due(snapshot: Snapshot, spec: ModelSpec, asleep: RuntimeRecord) -> str:
    """Why `asleep` should be woken now ahead of its model's next call, or ""."""
    keep = keep_alive_for(snapshot, spec)
    history = snapshot.history.get(spec.id)
    if keep.prewarm is None or history is None or history.last_call is None:
        return ""
    due = keep.prewarm - prewarm_lead(snapshot, spec.id)
    since = snapshot.now - history.last_call
    # Once per pause: an engine put to sleep after that point (by an eviction, or after waiting
    # for its call in vain) is not woken again for it.
    if due <= since < keep.warm_until and asleep.state_since <= history.last_call + due:
        return (f"pre-warm: idle {since:.0f} s, its calls come back from "
                f"{keep.prewarm / HEAD_MARGIN:.0f} s ({keep.basis})")
    return ""


def footprint_of(snapshot: Snapshot, record: RuntimeRecord) -> Footprint:
    """What the instance holds per GPU, from its catalog entry and its host's GPU memory."""
    return footprint(snapshot.catalog.get(record.model), snapshot.gpu_memory.get(record.gpu_host))


def wake_fits(snapshot: Snapshot, asleep: RuntimeRecord, held: Held) -> bool:
    """Whether the asleep instance's weights and KV cache fit back on its GPUs."""
    fp = footprint_of(snapshot, asleep)
    if fp.whole:
        return True  # it kept its GPUs whole while asleep
    memory = snapshot.gpu_memory.get(asleep.gpu_host)
    on_host = held.get(asleep.gpu_host, {})
    return all(fits(max(0.0, on_host.get(g, 0.0) - fp.asleep), fp.awake, memory)
               for g in asleep.gpus)


def grown(held: Held, snapshot: Snapshot, asleep: RuntimeRecord) -> Held:
    """`held` once `asleep` is awake again."""
    fp = footprint_of(snapshot, asleep)
    if fp.whole:
        return held
    return release(held, asleep, fp.asleep - fp.awake)


