"""The markdown of `bench.simulate`: one trace in full (`render_run`), or every scenario side by
side with its targets (`render_scenarios`, which writes `bench/SIMULATE.md`).

Every figure is computed from the runs passed in; the text around them says how to read them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from bench.sim_summary import Summary, summarize, targets
from bench.sim_trace import Trace
from bench.sim_world import Result, model_spec
from bench.tables import markdown_table
from runtimes.placement import footprint

HOW = """\
## How the simulation works

- One-second steps with exact event times: a call's wait runs from its arrival until an engine
  starts on it (after the load or wake it waited for, and behind a full engine's slots).
- Ours: every 5 s a `Snapshot` of the simulated world goes through `runtimes.policy.plan`; the
  actions are carried out as `ControlPlane` does (start and wake via `ensure_running`, which
  refuses a start, or a wake, when its memory is not free; drain; stop; sleep). A call that finds
  no ready engine does what the web app does: notes demand, asks for a start at once (which
  wakes a sleeping engine), and retries after each `Retry-After` until an engine is ready; each
  try counts as an arrival, as the web app counts it. The policy reads each model's idle
  periods from 10-second arrival buckets, as the registry keeps them.
- Memory, for all three alike (`runtimes.placement`): an engine holds weights, KV cache and 2 GB
  of overhead on its GPU (its `--gpu-memory-utilization` share), 1 GB when asleep; a GPU holds no
  more than 95 % of its memory; a model with no size given takes its GPU whole, asleep too.
  GPU time counts each engine by the share of its GPU's memory it holds.
- Baselines: a model loads on its first waiting request (realtime call, or a line of the most
  urgent batch job: a polite batch client sends lines of other jobs only to loaded models);
  unloads 300 s after its last request; when it does not fit, the least recently used loaded
  models with nothing in flight are unloaded until it does (both), and failing that the least
  recently used busy one is drained and then unloaded (keep-alive + LRU only; the TTL baseline
  waits). Queued batch lines count as requests in flight. Neither can sleep.
- GPU time is counted over the whole run, which goes on after the last arrival until every
  batch job is done and every engine is unloaded (or the run's cap).
"""

RESULT_COLUMNS = [
    "policy", "realtime calls", "calls that waited (load / wake / queue)", "cold starts",
    "mean wait (s)", "p95 wait (s)", "p99 wait (s)", "max wait (s)", "GPU-s loaded idle",
    "GPU-s asleep", "GPU-s busy", "GPU-s loading", "batch jobs in window / total",
    "evictions", "calls cut by evictions", "unserved",
]


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def result_row(s: Summary) -> list[str]:
    return [
        s.policy, str(s.calls),
        f"{s.calls_waited} ({s.cold_calls} / {s.wake_calls} / {s.queue_calls})",
        str(s.cold_starts), f"{s.mean_wait:.2f}", f"{s.p95:.1f}", f"{s.p99:.1f}",
        f"{s.max_wait:.0f}", f"{s.idle:.0f}", f"{s.asleep:.0f}", f"{s.busy:.0f}",
        f"{s.loading:.0f}", f"{s.jobs_on_time} / {s.jobs}", str(s.evictions), str(s.calls_cut),
        str(s.unserved),
    ]


LEGEND = (
    "*Wait*: from a call's arrival until an engine starts on it (in the real system a call that "
    "finds no ready engine gets 503 + Retry-After and retries). *Calls that waited*: any wait, "
    "split by what it waited for: a cold load, a wake-up, or only a full engine's queue. *Cold "
    "starts*: full loads at least one call waited for. *Loaded idle*: awake, serving nothing; "
    "*asleep*: its context only; *busy*: serving calls or batch lines; *loading*: a load or "
    "wake under way. *Calls cut*: calls in flight on an engine stopped under them (an eviction "
    "drains a busy engine first, so this should be 0)."
)


def _gpus(trace: Trace) -> str:
    text = ", ".join(f"{host}: {len(ids)} GPU{'s' if len(ids) != 1 else ''}"
                     for host, ids in trace.gpu_inventory.items())
    memory = sorted(set(trace.gpu_memory.values()))
    return text + (f" of {', '.join(f'{m:g}' for m in memory)} GB" if memory
                   else " (memory not modelled: each model takes its GPU whole)")


def _models_section(trace: Trace) -> list[str]:
    memory = next(iter(trace.gpu_memory.values()), None)
    rows = []
    for model in trace.models:
        calls = sum(1 for c in trace.calls if c.model == model.id)
        jobs = [j for j in trace.jobs if j.model == model.id]
        fp = footprint(model_spec(model), memory)
        size = ("whole GPU" if fp.whole else
                f"{model.weights_gb:g} + {fp.awake - model.weights_gb / max(1, model.gpus):.0f}"
                f" GB ({fp.fraction:.2f})")
        rows.append([f"`{model.id}`", f"{model.load_seconds:.0f}", f"{model.wake_seconds:.0f}",
                     size, str(calls), str(len(jobs)), str(sum(j.lines for j in jobs))])
    return markdown_table(["model", "cold load (s)", "wake (s)",
                   "weights + KV/overhead per GPU (share)", "realtime calls", "batch jobs",
                   "batch lines"], rows)


def _targets_lines(summaries: list[Summary]) -> list[str]:
    return [f"- **{'PASS' if met else 'FAIL'}** {text}" for met, text in targets(summaries)]


def _notes(results: list[Result]) -> list[str]:
    lines = []
    for result in results:
        ended = ("stopped at the time cap with work left" if result.capped
                 else f"all work done and every engine unloaded at {result.end / 3600:.2f} h")
        lines.append(f"- {result.policy}: {ended}" + ("" if result.notes else "."))
        lines += [f"  - {text}: {n}" for text, n in sorted(result.notes.items())]
    return lines


def render_run(trace: Trace, results: list[Result], command: str, wall: float) -> str:
    """The report of one trace: its models, every policy's figures, per model, the targets."""
    summaries = [summarize(r) for r in results]
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    per_model = []
    for model in trace.models:
        for result in results:
            s = summarize(result, model.id)
            per_model.append([f"`{model.id}`", result.policy, str(s.calls),
                              f"{s.calls_waited} ({s.cold_calls} / {s.wake_calls})",
                              f"{s.mean_wait:.2f}", f"{s.p99:.1f}", f"{s.max_wait:.0f}",
                              f"{s.idle:.0f}", f"{s.asleep:.0f}",
                              f"{s.jobs_on_time} / {s.jobs}", _minutes(s.mean_completion)])
    lines = [
        f"# Simulated {trace.name}: our autoscaling policy against two baselines",
        "",
        f"- Command: `{command}`",
        f"- {trace.duration / 3600:g} h of arrivals"
        + (f", seed {trace.seed}" if trace.seed is not None else "")
        + f"; {_gpus(trace)}; engines run {trace.concurrency} sequences at once",
        f"- Date: {today}; {wall:.1f} s wall clock for the three runs",
        f"- Ours: `runtimes.policy.plan` every 5 s, vLLM sleep mode, `SLEEP_AFTER_SECONDS` "
        f"{_sleep_after(results):g}, `IDLE_TIMEOUT_SECONDS` 600, min lifetime 60 s. Baselines: "
        "no sleep mode, keep-alive 300 s.",
        "",
        "## Models",
        "",
        *_models_section(trace),
        "",
        "## Results",
        "",
        *markdown_table(RESULT_COLUMNS, [result_row(s) for s in summaries]),
        "",
        LEGEND,
        "",
        "## Per model",
        "",
        *markdown_table(["model", "policy", "calls", "waited (load / wake)", "mean wait (s)",
                 "p99 wait (s)", "max wait (s)", "GPU-s loaded idle", "GPU-s asleep",
                 "batch in window", "mean batch completion (min)"], per_model),
        "",
        "## Targets",
        "",
        *_targets_lines(summaries),
        "",
        "## Notes",
        "",
        *_notes(results),
        "",
        HOW.rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ScenarioRun:
    name: str
    about: str
    trace: Trace
    results: list[Result]
    command: str


def render_scenarios(runs: list[ScenarioRun], engine_text: str, command: str, wall: float,
                     discussion: str = "") -> str:
    """Every scenario: its table of all three policies, and whether ours met its targets."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    overview, sections, failures = [], [], []
    for run in runs:
        summaries = [summarize(r) for r in run.results]
        outcome = targets(summaries)
        failed = [text for met, text in outcome if not met]
        overview.append([f"[{run.name}](#{_anchor(run.name)})", _gpus(run.trace),
                         str(len(run.trace.calls)), str(len(run.trace.jobs)),
                         "all met" if not failed else f"{len(failed)} missed"])
        failures += [f"- {run.name}: {text}" for text in failed]
        sections += [
            f"### {run.name}",
            "",
            f"{run.about}. {_gpus(run.trace)}. `{run.command}`",
            "",
            *markdown_table(RESULT_COLUMNS, [result_row(s) for s in summaries]),
            "",
            *_targets_lines(summaries),
            "",
            *_notes(run.results),
            "",
        ]
    lines = [
        "# Simulated GPU box: our autoscaling policy against two baselines",
        "",
        f"- Command: `{command}` ({wall:.0f} s wall clock; each scenario's own command is "
        "given with it, and writes its full report)",
        f"- Date: {today}",
        f"- {engine_text}",
        f"- Ours: `runtimes.policy.plan` every 5 s, vLLM sleep mode, `SLEEP_AFTER_SECONDS` "
        f"{_sleep_after(runs[0].results):g}, `IDLE_TIMEOUT_SECONDS` 600, min lifetime 60 s. "
        "Baselines: llama-swap style (TTL 300 s, "
        "unloads only idle models) and Ollama style (keep-alive 5 min, LRU, drains a busy one "
        "when it must); no sleep mode; all three place by memory.",
        "",
        *markdown_table(["scenario", "GPUs", "realtime calls", "batch jobs", "targets"], overview),
        "",
        "Targets, in every scenario: ours no worse than both baselines on calls that waited, "
        "mean wait, p99 wait and loaded-idle GPU time, and clearly better on at least one; no "
        "call cut by an eviction; every batch job in its window; every call served.",
        "",
        "## Where ours does not win",
        "",
        *(failures or ["- every target met in every scenario"]),
        "",
        *([discussion.rstrip("\n"), ""] if discussion else []),
        "## Scenarios",
        "",
        LEGEND,
        "",
        *sections,
        HOW.rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


def _sleep_after(results: list[Result]) -> float:
    return next((r.sleep_after for r in results if r.sleep_after is not None), 0.0)


def _anchor(name: str) -> str:
    return name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
