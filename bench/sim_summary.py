"""The figures of a simulated run (`Summary`), their JSON form, and the targets ours must meet.

A call *waited* when its engine started on it later than it arrived, for whatever reason: a
cold load, a wake-up, or a full engine's queue; the three are also counted apart, so a report
can say why. GPU time is memory-weighted (see `bench.sim_world`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bench.sim_world import Result

# Below this a wait is rounding, not waiting.
WAITED_SECONDS = 1e-6
# "Clearly better": by more than this share of the better baseline's figure.
CLEARLY = 0.05


@dataclass(frozen=True)
class Summary:
    """The figures of one policy's run that the reports show."""

    policy: str
    key: str
    calls: int
    unserved: int
    cold_starts: int  # distinct full loads at least one realtime call waited for
    cold_calls: int  # realtime calls that waited for a full load
    wakes: int
    wakes_waited: int  # distinct wakes at least one realtime call waited for
    wake_calls: int  # realtime calls that waited for a wake-up
    calls_waited: int  # realtime calls that waited at all
    p95: float
    p99: float
    mean_wait: float
    max_wait: float
    jobs_on_time: int
    jobs_late: int  # finished after the window
    jobs_unfinished: int
    jobs: int
    mean_completion: float | None  # seconds, over finished jobs
    busy: float
    idle: float
    asleep: float
    loading: float
    evictions: int
    calls_cut: int  # realtime calls in flight on an engine stopped under them
    loads: int

    @property
    def queue_calls(self) -> int:
        """Calls that waited only behind a full engine."""
        return self.calls_waited - self.cold_calls - self.wake_calls


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(result: Result, model: str | None = None) -> Summary:
    served = [s for s in result.served.values() if model is None or s.model == model]
    calls = [c for c in result.trace.calls if model is None or c.model == model]
    waits = [s.wait for s in served]
    jobs = [j for j in result.jobs.values() if model is None or j.job.model == model]
    finished = [j for j in jobs if j.finished_at is not None]
    on_time = [j for j in finished if j.finished_at <= j.job.deadline + 1e-9]
    gpu = result.gpu_seconds

    def seconds(kind: str) -> float:
        return gpu[kind] if model is None else gpu[kind, model]

    return Summary(
        policy=result.policy,
        key=result.key,
        calls=len(calls),
        unserved=len(calls) - len(served),
        cold_starts=len({s.readiness_id for s in served if s.waited_for == "load"}),
        cold_calls=sum(1 for s in served if s.waited_for == "load"),
        wakes=result.wakes,
        wakes_waited=len({s.readiness_id for s in served if s.waited_for == "wake"}),
        wake_calls=sum(1 for s in served if s.waited_for == "wake"),
        calls_waited=sum(1 for s in served if s.wait > WAITED_SECONDS),
        p95=percentile(waits, 95),
        p99=percentile(waits, 99),
        mean_wait=statistics.fmean(waits) if waits else 0.0,
        max_wait=max(waits, default=0.0),
        jobs_on_time=len(on_time),
        jobs_late=len(finished) - len(on_time),
        jobs_unfinished=len(jobs) - len(finished),
        jobs=len(jobs),
        mean_completion=(statistics.fmean(j.finished_at - j.job.submitted for j in finished)
                         if finished else None),
        busy=seconds("busy"), idle=seconds("idle"), asleep=seconds("asleep"),
        loading=seconds("loading"),
        evictions=result.evictions,
        calls_cut=result.notes.get("realtime calls cut off by a stop", 0),
        loads=result.loads,
    )


def as_json(s: Summary) -> dict:
    """One policy's row of `--json`: the issue's fields first, then the breakdowns."""
    return {
        "policy": s.key, "cold_starts": s.cold_starts, "calls_waited": s.calls_waited,
        "mean_wait_s": round(s.mean_wait, 3), "p95_wait_s": round(s.p95, 3),
        "p99_wait_s": round(s.p99, 3), "max_wait_s": round(s.max_wait, 3),
        "loaded_idle_gpu_s": round(s.idle, 1), "asleep_gpu_s": round(s.asleep, 1),
        "unserved": s.unserved, "batch_on_time": s.jobs_on_time, "batch_jobs": s.jobs,
        "calls": s.calls, "calls_waited_for_load": s.cold_calls,
        "calls_waited_for_wake": s.wake_calls, "calls_waited_in_queue": s.queue_calls,
        "busy_gpu_s": round(s.busy, 1), "loading_gpu_s": round(s.loading, 1),
        "evictions": s.evictions, "calls_cut_by_evictions": s.calls_cut, "loads": s.loads,
        "wakes": s.wakes,
    }


# The columns ours must not lose on: (label, attribute, format).
COMPARED = (
    ("calls that waited", "calls_waited", "{:.0f}"),
    ("mean wait", "mean_wait", "{:.2f} s"),
    ("p99 wait", "p99", "{:.1f} s"),
    ("loaded-idle GPU time", "idle", "{:.0f} GPU-s"),
)


def targets(summaries: list[Summary]) -> list[tuple[bool, str]]:
    """(met, sentence) for each target of ours against both baselines."""
    ours = next(s for s in summaries if s.key == "ours")
    others = [s for s in summaries if s.key != "ours"]
    out = []
    better = []
    for label, attr, fmt in COMPARED:
        mine, theirs = getattr(ours, attr), [getattr(o, attr) for o in others]
        # Figures are compared as the report prints them.
        shown = [float(fmt.split()[0].format(v)) for v in (mine, *theirs)]
        out.append((shown[0] <= min(shown[1:]),
                    f"{label} no worse than both baselines: ours {fmt.format(mine)}, "
                    + ", ".join(f"{o.key} {fmt.format(v)}" for o, v in zip(others, theirs,
                                                                          strict=True))))
        best = min(shown[1:])
        if shown[0] < best - CLEARLY * best:
            better.append(label)
    out.append((bool(better), "clearly better (by more than 5 %) than both on at least one: "
                + (", ".join(better) if better else "none")))
    out.append((ours.calls_cut == 0,
                f"no eviction cuts calls in flight (busy engines are drained first): "
                f"{ours.calls_cut} calls cut"))
    out.append((ours.jobs_on_time == ours.jobs,
                f"every batch job within its window: {ours.jobs_on_time} / {ours.jobs} "
                f"({ours.jobs_late} late, {ours.jobs_unfinished} unfinished)"))
    out.append((ours.unserved == 0,
                f"every realtime call served: {ours.calls - ours.unserved} / {ours.calls}"))
    return out
