"""`make simulate`: replay a synthetic day through the autoscaling policy in simulated time.

    .venv/bin/python -m bench.simulate [--seed N] [--hours H] [--out PATH]

Generates a deterministic trace (`bench.sim_trace`: three models on a box with two GPUs, bursty
realtime calls over a day, batch jobs with completion windows), replays it through our policy
(`runtimes.policy.plan`, called every 5 simulated seconds, with sleep mode) and through two
baselines on the same trace and GPUs (`bench.sim_policies`), and writes a markdown report
(default `bench/results/simulate.md`) that it also prints: one row per policy, a row per model,
and whether ours meets its targets (fewer realtime cold starts and less loaded-idle GPU time than
both baselines, every batch job within its window).

Exit status: 0 when the report was written, whether or not the targets were met; 1 on an
internal error (the simulated world became inconsistent, or a policy raised).
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench.sim_policies import POLICIES, KeepAliveBaseline, PlanPolicy, TtlBaseline
from bench.sim_trace import Trace, generate_trace
from bench.sim_world import BATCH_LINES_PER_SECOND, CONCURRENCY, Result

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "simulate.md"


@dataclass(frozen=True)
class Summary:
    """The figures of one policy's run that the report shows."""

    policy: str
    calls: int
    unserved: int
    cold_starts: int  # distinct full loads at least one realtime call waited for
    cold_calls: int  # realtime calls that waited for a full load
    wakes: int
    wakes_waited: int  # distinct wakes at least one realtime call waited for
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
    loads: int


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
    return Summary(
        policy=result.policy,
        calls=len(calls),
        unserved=len(calls) - len(served),
        cold_starts=len({s.readiness_id for s in served if s.waited_for == "load"}),
        cold_calls=sum(1 for s in served if s.waited_for == "load"),
        wakes=result.wakes,
        wakes_waited=len({s.readiness_id for s in served if s.waited_for == "wake"}),
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
        busy=gpu["busy"], idle=gpu["idle"], asleep=gpu["asleep"], loading=gpu["loading"],
        evictions=result.evictions,
        loads=result.loads,
    )


def run_all(trace: Trace, *, check: bool = True) -> list[Result]:
    """Every policy on the same trace, ours first."""
    return [policy(trace, check=check).run() for policy in POLICIES]


# -- the report --------------------------------------------------------------------------------


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _trace_section(trace: Trace) -> list[str]:
    rows = []
    for model in trace.models:
        calls = sum(1 for c in trace.calls if c.model == model.id)
        jobs = [j for j in trace.jobs if j.model == model.id]
        rows.append([f"`{model.id}`", f"{model.load_seconds:.0f}", f"{model.wake_seconds:.0f}",
                     str(calls), str(len(jobs)), str(sum(j.lines for j in jobs)),
                     str(sum(1 for j in jobs if j.window < 24 * 3600))])
    gpus = ", ".join(f"{host}: {list(ids)}" for host, ids in trace.gpu_inventory.items())
    return [
        "## Trace",
        "",
        f"{trace.duration / 3600:g} h from {trace.start_hour:02.0f}:00, GPUs {gpus}, every model "
        f"on 1 GPU. Engines run up to {CONCURRENCY} calls at once (1-6 s each, FIFO beyond "
        f"that) and work off batch lines at {BATCH_LINES_PER_SECOND:g} lines/s times the share "
        "of slots realtime leaves free.",
        "",
        *_table(["model", "cold load (s)", "wake (s)", "realtime calls", "batch jobs",
                 "batch lines", "jobs with a 4 h window"], rows),
    ]


def _results_section(summaries: list[Summary]) -> list[str]:
    rows = []
    for s in summaries:
        ours = s.policy == PlanPolicy.name
        rows.append([
            s.policy,
            str(s.calls) + (f" ({s.unserved} unserved)" if s.unserved else ""),
            str(s.cold_starts),
            str(s.cold_calls),
            f"{s.wakes_waited} / {s.wakes}" if ours else "-",
            f"{s.p95:.1f}",
            f"{s.p99:.1f}",
            f"{s.mean_wait:.2f} / {s.max_wait:.0f}",
            f"{s.jobs_on_time} / {s.jobs}",
            _minutes(s.mean_completion),
            f"{s.busy:.0f}",
            f"{s.idle:.0f}",
            f"{s.asleep:.0f}" if ours else "-",
            f"{s.loading:.0f}",
            str(s.evictions),
            str(s.loads),
        ])
    return [
        "## Results",
        "",
        *_table(["policy", "realtime calls", "realtime cold starts",
                 "calls that waited for one", "wakes (a call waited / all)", "p95 wait (s)",
                 "p99 wait (s)", "mean / max wait (s)", "batch jobs in window / total",
                 "mean batch completion (min)", "GPU-s busy", "GPU-s loaded idle",
                 "GPU-s asleep", "GPU-s loading", "swaps / evictions", "total loads"], rows),
        "",
        "*Realtime cold starts*: full loads that at least one realtime call waited for. *Wait*: "
        "from a call's arrival until an engine starts on it (a call that finds no ready engine "
        "waits until one is ready; in the real system it gets 503 + Retry-After and retries). "
        "*Busy*: awake and serving a call or batch lines; *loaded idle*: awake, serving "
        "nothing; *loading*: cold load or wake under way.",
    ]


def _per_model_section(results: list[Result]) -> list[str]:
    rows = []
    for model in results[0].trace.models:
        for result in results:
            s = summarize(result, model.id)
            rows.append([f"`{model.id}`", result.policy, str(s.calls), str(s.cold_starts),
                         str(s.wakes_waited) if result.policy == PlanPolicy.name else "-",
                         f"{s.p95:.1f}", f"{s.p99:.1f}", f"{s.max_wait:.0f}",
                         f"{s.jobs_on_time} / {s.jobs}", _minutes(s.mean_completion)])
    return [
        "## Per model",
        "",
        *_table(["model", "policy", "calls", "cold starts", "wakes waited for",
                 "p95 wait (s)", "p99 wait (s)", "max wait (s)", "batch in window",
                 "mean batch completion (min)"], rows),
    ]


def targets(summaries: list[Summary]) -> list[tuple[bool, str]]:
    """(met, sentence) for each target of ours against both baselines."""
    by_name = {s.policy: s for s in summaries}
    ours, ttl, keep = (by_name[PlanPolicy.name], by_name[TtlBaseline.name],
                       by_name[KeepAliveBaseline.name])
    late = ours.jobs - ours.jobs_on_time
    return [
        (ours.cold_starts < ttl.cold_starts and ours.cold_starts < keep.cold_starts,
         f"fewer realtime cold starts than both baselines: ours {ours.cold_starts}, "
         f"fixed TTL {ttl.cold_starts}, keep-alive {keep.cold_starts}"),
        (ours.idle < ttl.idle and ours.idle < keep.idle,
         f"less loaded-idle GPU time than both baselines: ours {ours.idle:.0f} GPU-s, "
         f"fixed TTL {ttl.idle:.0f}, keep-alive {keep.idle:.0f}"),
        (late == 0 and ours.jobs > 0,
         f"batch work done within its window: ours {ours.jobs_on_time} / {ours.jobs} jobs "
         f"({ours.jobs_late} late, {ours.jobs_unfinished} unfinished)"),
        (ours.unserved == 0,
         f"every realtime call served: ours {ours.calls - ours.unserved} / {ours.calls}"),
    ]


HOW = """\
## How the simulation works

- One-second steps with exact event times: a call's wait runs from its arrival until an engine
  starts on it (after the load or wake it waited for, and behind a full engine's slots).
- Ours: every 5 s a `Snapshot` of the simulated world goes through `runtimes.policy.plan`; the
  actions are carried out as `ControlPlane` does (start and wake via `ensure_running`, which
  refuses a start when no GPU is free; drain; stop; sleep). A call that finds no ready engine does
  what the web app does: notes demand, asks for a start at once (which wakes a sleeping engine),
  and retries after each `Retry-After` until an engine is ready.
- Baselines: a model loads on its first waiting request (realtime call, or a line of the most
  urgent batch job: a polite batch client sends lines of other jobs only to loaded models);
  unloads 300 s after its last request; with no free GPU the least recently used loaded model
  with nothing in flight is unloaded (both), and failing that the least recently used busy one
  is drained and then unloaded (keep-alive + LRU only; the TTL baseline waits). Queued batch
  lines count as requests in flight.
- GPU time is counted per GPU and second over the whole run, which goes on after the last arrival
  until every batch job is done and every engine is unloaded.
"""


def _notes_section(results: list[Result]) -> list[str]:
    lines = ["## Notes", ""]
    for result in results:
        ended = ("stopped at the time cap with work left" if result.capped
                 else f"all work done and every engine unloaded at {result.end / 3600:.1f} h")
        lines.append(f"- {result.policy}: {ended}" + ("" if result.notes else "."))
        lines += [f"  - {text}: {n}" for text, n in sorted(result.notes.items())]
    return lines


def render(trace: Trace, results: list[Result], command: str, wall: float) -> str:
    summaries = [summarize(r) for r in results]
    outcome = targets(summaries)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Simulated day: our autoscaling policy against two baselines",
        "",
        f"- Command: `{command}`",
        f"- Seed: {trace.seed}, {trace.duration / 3600:g} h of arrivals",
        f"- Date: {today}; {wall:.1f} s wall clock for the three runs",
        "- Ours: `runtimes.policy.plan` every 5 s, vLLM sleep mode, sleep after 120 s idle, "
        "stop after 600 s, min lifetime 60 s. Baselines: no sleep mode, keep-alive 300 s.",
        "",
        *_trace_section(trace),
        "",
        *_results_section(summaries),
        "",
        *_per_model_section(results),
        "",
        "## Targets",
        "",
        *[f"- **{'PASS' if met else 'FAIL'}** {text}" for met, text in outcome],
        "",
        *_notes_section(results),
        "",
        HOW.rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    parser.add_argument("--hours", type=float, default=24.0, help="hours of arrivals (24)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report path (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    if args.hours <= 0:
        parser.error("--hours must be positive")

    command = "python -m bench.simulate " + shlex.join(
        ["--seed", str(args.seed), "--hours", f"{args.hours:g}"])
    started = time.monotonic()
    try:
        trace = generate_trace(args.seed, args.hours)
        results = run_all(trace)
        report = render(trace, results, command, time.monotonic() - started)
    except Exception:
        traceback.print_exc()
        print("simulate: internal error, no report written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
