"""`make simulate`: replay a day, or a trace, through the autoscaling policy in simulated time.

    .venv/bin/python -m bench.simulate [--seed N] [--hours H] [--out PATH] [--json PATH]
    .venv/bin/python -m bench.simulate --trace FILE.csv --models MODELS.json --gpus N
        [--gpu-memory-gb G] [--prefill-tps T] [--decode-tps T] [--concurrency C]
        [--out PATH] [--json PATH]
    .venv/bin/python -m bench.simulate --scenarios [--azure DIR] [--out PATH] [--json PATH]

Without `--trace` it replays the synthetic day (`bench.sim_trace`: three models on a box with
two GPUs, bursty realtime calls, batch jobs with completion windows). `--trace` replays a CSV of
calls and batch lines on the models of a JSON file (`bench.sim_tracefile` says the formats),
with service times from the tokens through the engine model the flags state. `--scenarios`
builds the trace scenarios from the public Azure LLM inference traces (`bench.sim_scenarios`),
runs each on one GPU and on two, and the synthetic day, and writes one report of them all: the
one committed as `bench/SIMULATE.md` (`--out bench/SIMULATE.md`).

Each trace goes through our policy (`runtimes.policy.plan` every 5 simulated seconds, with sleep
mode) and through two baselines on the same calls, GPUs and memory (`bench.sim_policies`). The
report (default `bench/results/simulate.md`) is also printed; `--json` writes
`{"policies": [{"policy": "ours" | "ttl" | "keepalive-lru", "cold_starts", "calls_waited",
"mean_wait_s", "p95_wait_s", "p99_wait_s", "max_wait_s", "loaded_idle_gpu_s", "asleep_gpu_s",
"unserved", "batch_on_time", "batch_jobs", ...}]}` (with `--scenarios`: a list of those per
scenario).

Exit status: 0 when the report was written, whether or not the targets were met; 1 on an
internal error (the simulated world became inconsistent, or a policy raised); 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

from bench.sim_policies import POLICIES, PlanPolicy
from bench.sim_report import ScenarioRun, render_run, render_scenarios
from bench.sim_scenarios import (
    AZURE_DIR,
    GPU_COUNTS,
    GPU_MEMORY_GB,
    SCENARIOS,
    AzureTraces,
    write,
)
from bench.sim_summary import as_json, summarize, targets
from bench.sim_trace import Trace, generate_trace
from bench.sim_tracefile import EngineModel, TraceFileError, load_trace
from bench.sim_world import Result

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "simulate.md"
SCENARIO_DIR = REPO_ROOT / "bench" / "results" / "scenarios"

__all__ = ["main", "run_all", "summarize", "targets"]


def run_all(trace: Trace, *, check: bool = True, sleep_after: float = 120.0) -> list[Result]:
    """Every policy on the same trace, ours first (`sleep_after`: its SLEEP_AFTER_SECONDS)."""
    return [(PlanPolicy(trace, check=check, sleep_after=sleep_after) if policy is PlanPolicy
             else policy(trace, check=check)).run() for policy in POLICIES]


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _engine_args(engine: EngineModel) -> list[str]:
    return ["--prefill-tps", f"{engine.prefill_tokens_per_second:g}",
            "--decode-tps", f"{engine.decode_tokens_per_second:g}",
            "--concurrency", str(engine.concurrency)]


def trace_command(trace_path: Path, models_path: Path, gpus: int, memory: float | None,
                  engine: EngineModel) -> str:
    args = ["--trace", _relative(trace_path), "--models", _relative(models_path),
            "--gpus", str(gpus), *(["--gpu-memory-gb", f"{memory:g}"] if memory else []),
            *_engine_args(engine)]
    return "python -m bench.simulate " + shlex.join(args)


def engine_text(engine: EngineModel) -> str:
    return (f"Engine model of the trace scenarios: prefill {engine.prefill_tokens_per_second:g} "
            f"tokens/s, decode {engine.decode_tokens_per_second:g} tokens/s per sequence, "
            f"{engine.concurrency} sequences at once (`{shlex.join(_engine_args(engine))}`); "
            "the synthetic day keeps its own (32 sequences, 1-6 s calls)")


# What `--scenarios` says under "Where ours does not win": why, not how much (the figures are
# in the tables above it).
DISCUSSION = """\
Why, where a column is lost (the figures are in each scenario's table below):

- *Calls that waited*, lost by wake-ups (see the *wake* part of the column; the baselines have
  none): ours puts an idle engine to sleep after `SLEEP_AFTER_SECONDS` (120 s) unless its
  history says its next call is likely within that much more, where the baselines keep it
  loaded for 300 s. One-hour traces rarely hold the five idle periods of two to five minutes
  the history needs to say so, so a model whose calls pause that long (the code trace's
  bursts) sleeps and is woken for the next one: that call waits a few seconds where the
  baselines' waits nothing, and the loaded-idle GPU time saved is the other side of the same
  trade. `python -m bench.simulate --scenarios --sleep-after 300` shows it: those calls no
  longer wait, and the loaded-idle column is lost instead. Over days the history holds those
  pauses and keeps such a model awake through them (`tests/runtimes/test_policy_memory.py`).
- *Mean wait* on taking-turns (one GPU): when a turn begins, the model just left idle is
  evicted only once the new model's callers have waited as long as its recent rate says the
  swap costs (a rule-of-three bound on a rate after seconds of silence, so a few seconds),
  where the baselines unload an idle model at the first call; the burst waits those seconds.
  On two GPUs the difference is the wake-ups above.
- *p99 wait* and *loaded-idle GPU time* on hot-and-rare, one GPU: the box is too small for the
  load. The baselines' figures are low because of what they do not serve: the TTL baseline
  never evicts a model with calls in flight, so the rarely called model waits most of the
  hour (its *max wait*) and is not loaded to be idle; both baselines keep evicting the 8B
  model for cold loads (its calls wait for those: the *load* part of the column), so it is
  rarely loaded and idle either. Ours keeps the 8B loaded beside the hot model, swaps the hot
  and the rare one by sleep and wake (seconds, not a load), and each swap first drains the
  hot model's long calls, which puts some of its calls in the top percent.
"""


def scenario_runs(azure: AzureTraces, engine: EngineModel, directory: Path,
                  sleep_after: float = 120.0) -> list[ScenarioRun]:
    day = generate_trace(1, 24.0)
    extra = [] if sleep_after == 120.0 else ["--sleep-after", f"{sleep_after:g}"]
    runs = [ScenarioRun("synthetic day", "3 models, bursty realtime over 24 h, 21 batch jobs",
                        day, run_all(day, sleep_after=sleep_after),
                        "python -m bench.simulate " + shlex.join(
                            ["--seed", "1", "--hours", "24", *extra]))]
    for scenario in SCENARIOS:
        trace_path, models_path = write(scenario, azure, directory)
        for gpus in GPU_COUNTS:
            trace = load_trace(trace_path, models_path, gpus=gpus, gpu_memory_gb=GPU_MEMORY_GB,
                               engine=engine)
            command = trace_command(trace_path, models_path, gpus, GPU_MEMORY_GB, engine)
            runs.append(ScenarioRun(
                f"{scenario.name}, {gpus} GPU{'s' if gpus > 1 else ''}", scenario.about, trace,
                run_all(trace, sleep_after=sleep_after), " ".join([command, *extra])))
    return runs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="synthetic day: seed (default 1)")
    parser.add_argument("--hours", type=float, default=24.0, help="synthetic day: hours (24)")
    parser.add_argument("--trace", type=Path, help="a CSV of calls to replay instead")
    parser.add_argument("--models", type=Path, help="with --trace: the models JSON")
    parser.add_argument("--gpus", type=int, default=2, help="with --trace: GPUs (default 2)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="with --trace: GB per GPU (default: not modelled, one model a GPU)")
    defaults = EngineModel()
    parser.add_argument("--prefill-tps", type=float,
                        default=defaults.prefill_tokens_per_second,
                        help="prompt tokens per second (default %(default)g)")
    parser.add_argument("--decode-tps", type=float, default=defaults.decode_tokens_per_second,
                        help="output tokens per second of one sequence (default %(default)g)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency,
                        help="sequences an engine runs at once (default %(default)d)")
    parser.add_argument("--sleep-after", type=float, default=120.0,
                        help="ours: SLEEP_AFTER_SECONDS, idle before sleep when the history "
                             "says nothing (default %(default)g)")
    parser.add_argument("--scenarios", action="store_true",
                        help="every Azure scenario on 1 and 2 GPUs, and the synthetic day")
    parser.add_argument("--azure", type=Path, default=AZURE_DIR,
                        help="with --scenarios: the Azure traces' directory (default "
                             "../shared/traces)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report path (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.hours <= 0:
        parser.error("--hours must be positive")
    if args.trace is not None and args.models is None:
        parser.error("--trace needs --models")
    if args.gpus < 1 or args.concurrency < 1 or min(args.prefill_tps, args.decode_tps) <= 0:
        parser.error("--gpus, --concurrency and the token rates must be positive")
    engine = EngineModel(args.prefill_tps, args.decode_tps, args.concurrency)
    started = time.monotonic()
    try:
        if args.scenarios:
            runs = scenario_runs(AzureTraces(args.azure), engine, SCENARIO_DIR, args.sleep_after)
            command = "python -m bench.simulate --scenarios" + (
                f" --sleep-after {args.sleep_after:g}" if args.sleep_after != 120.0 else "")
            report = render_scenarios(runs, engine_text(engine), command,
                                      time.monotonic() - started, DISCUSSION)
            figures = {"scenarios": [
                {"name": run.name, "gpus": sum(len(g) for g in run.trace.gpu_inventory.values()),
                 "gpu_memory_gb": next(iter(run.trace.gpu_memory.values()), None),
                 "command": run.command,
                 "policies": [as_json(summarize(r)) for r in run.results]} for run in runs]}
        else:
            if args.trace is not None:
                trace = load_trace(args.trace, args.models, gpus=args.gpus,
                                   gpu_memory_gb=args.gpu_memory_gb, engine=engine)
                command = trace_command(args.trace, args.models, args.gpus, args.gpu_memory_gb,
                                        engine)
            else:
                trace = generate_trace(args.seed, args.hours)
                command = "python -m bench.simulate " + shlex.join(
                    ["--seed", str(args.seed), "--hours", f"{args.hours:g}"])
            if args.sleep_after != 120.0:
                command += f" --sleep-after {args.sleep_after:g}"
            results = run_all(trace, sleep_after=args.sleep_after)
            report = render_run(trace, results, command, time.monotonic() - started)
            figures = {"policies": [as_json(summarize(r)) for r in results]}
    except (TraceFileError, OSError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("simulate: internal error, no report written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print(report)
    print(f"(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
