"""Tests of `bench.simulate --trace`: reading a CSV and a models file (service times from tokens,
batch jobs, errors named by row), the JSON figures, GPU memory in the simulated world (engines
that fit share a GPU, none ever holds more than its memory), a hot model beside a rare one on one
GPU, and the Azure scenarios (read from ../shared/traces beside the checkout, as CI has it)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench import simulate
from bench.sim_policies import POLICIES, KeepAliveBaseline, PlanPolicy, TtlBaseline
from bench.sim_scenarios import AZURE_DIR, GPU_MEMORY_GB, SCENARIOS, AzureTraces, write
from bench.sim_scenarios import MODELS as MODELS_OF_SCENARIOS
from bench.sim_summary import summarize
from bench.sim_trace import Call, SimModel, Trace
from bench.sim_tracefile import EngineModel, TraceFileError, load_trace
from runtimes.placement import capacity

MODELS = [
    {"id": "hot", "load_seconds": 60, "wake_seconds": 2, "gpus": 1, "weights_gb": 28,
     "kv_cache_gb": 14},
    {"id": "rare", "load_seconds": 60, "wake_seconds": 2, "gpus": 1, "weights_gb": 29.5,
     "kv_cache_gb": 10},
    {"id": "small", "load_seconds": 30, "wake_seconds": 1, "gpus": 1, "weights_gb": 16,
     "kv_cache_gb": 6},
]
FIELDS = ["timestamp", "model", "prompt_tokens", "output_tokens", "kind", "job", "priority",
          "window_s"]


def write_trace(directory: Path, rows: list[dict], models=MODELS) -> tuple[Path, Path]:
    trace, models_path = directory / "trace.csv", directory / "models.json"
    with open(trace, "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    models_path.write_text(json.dumps(models))
    return trace, models_path


def call(at, model, prompt=400, output=100, **extra):
    return {"timestamp": at, "model": model, "prompt_tokens": prompt, "output_tokens": output,
            **extra}


# ---------------------------------------------------------------- reading trace files


def test_a_csv_of_date_times_and_batch_lines_becomes_calls_and_jobs(tmp_path):
    rows = [call("2023-11-16 18:15:46.6805900", "hot", 4000, 50),
            call("2023-11-16 18:15:56.6805900", "small"),
            *[call("2023-11-16 18:16:06.6805900", "small", 1000, 100, kind="batch", job="j1",
                   priority=9, window_s=600) for _ in range(3)]]
    trace = load_trace(*write_trace(tmp_path, rows), gpus=2, gpu_memory_gb=80,
                       engine=EngineModel(prefill_tokens_per_second=4000,
                                          decode_tokens_per_second=50, concurrency=16))
    assert [(c.model, c.arrival) for c in trace.calls] == [("hot", 0.0),
                                                          ("small", pytest.approx(10.0))]
    assert trace.calls[0].service == pytest.approx(4000 / 4000 + 50 / 50)  # from the tokens
    (job,) = trace.jobs
    assert (job.model, job.lines, job.window) == ("small", 3, 600.0)
    assert job.submitted == pytest.approx(20.0)
    assert job.priority == 0  # the API's 9 (most urgent) is the simulator's 0
    assert job.line_seconds == pytest.approx(1000 / 4000 + 100 / 50)
    assert (trace.gpu_inventory, trace.gpu_memory, trace.concurrency) == (
        {"local": (0, 1)}, {"local": 80.0}, 16)


@pytest.mark.parametrize(("row", "message"), [
    (call(0, "nope"), "row 2: model 'nope' is not in"),
    (call(0, "hot", kind="batch"), "row 2: a batch line needs a job"),
    (call("noon", "hot"), "row 2: timestamp 'noon'"),
    (call(0, "hot", kind="offline"), "row 2: kind is realtime or batch"),
])
def test_a_bad_row_is_named(tmp_path, row, message):
    with pytest.raises(TraceFileError, match=message):
        load_trace(*write_trace(tmp_path, [row]), gpus=1)


def test_main_replays_a_trace_and_writes_the_issues_json(tmp_path):
    rows = [call(t, "hot") for t in range(0, 120, 3)] + [call(50, "small")]
    trace, models = write_trace(tmp_path, rows)
    out, figures = tmp_path / "report.md", tmp_path / "figures.json"
    assert simulate.main(["--trace", str(trace), "--models", str(models), "--gpus", "1",
                          "--gpu-memory-gb", "80", "--out", str(out), "--json",
                          str(figures)]) == 0
    document = json.loads(figures.read_text())
    assert [p["policy"] for p in document["policies"]] == ["ours", "ttl", "keepalive-lru"]
    for row in document["policies"]:
        assert {"cold_starts", "calls_waited", "mean_wait_s", "p95_wait_s", "p99_wait_s",
                "max_wait_s", "loaded_idle_gpu_s", "asleep_gpu_s", "unserved",
                "batch_on_time", "batch_jobs"} <= set(row)
        assert row["unserved"] == 0 and row["calls"] == len(rows)
    assert "--gpu-memory-gb 80" in out.read_text()


def test_main_refuses_a_trace_without_models(capsys):
    with pytest.raises(SystemExit):
        simulate.main(["--trace", "x.csv"])
    assert "--trace needs --models" in capsys.readouterr().err


# ---------------------------------------------------------------- memory in the world


def memory_run(policy, trace: Trace):
    """A run with the GB held on every GPU recorded at every step, by the test."""
    world = policy(trace)
    steps: list[dict] = []
    account = world._account

    def recording(t, world=world, steps=steps, account=account):
        steps.append({(host, gpu): amount for host, gpus in world.held().items()
                      for gpu, amount in gpus.items()})
        account(t)

    world._account = recording
    return world.run(), steps


def models(*ids):
    return tuple(SimModel(id=m["id"], load_seconds=m["load_seconds"],
                          wake_seconds=m["wake_seconds"], weights_gb=m["weights_gb"],
                          kv_cache_gb=m["kv_cache_gb"]) for m in MODELS if m["id"] in ids)


def test_models_that_fit_share_a_gpu_in_every_policy_and_none_overfills_it():
    calls = [Call(i, "hot" if i % 2 else "small", arrival=float(i), service=1.0)
             for i in range(200)]
    trace = Trace(models=models("hot", "small"), calls=tuple(calls), jobs=(), duration=200.0,
                  gpu_inventory={"local": (0,)}, gpu_memory={"local": GPU_MEMORY_GB})
    for policy in POLICIES:
        result, steps = memory_run(policy, trace)
        assert result.unserved == 0
        # One cold load each, side by side on the one GPU: after them nobody waits.
        assert result.loads == 2, policy.name
        assert max(s.wait for s in result.served.values() if s.waited_for != "load") == 0.0
        assert max(sum(step.values()) for step in steps) <= capacity(GPU_MEMORY_GB)
        assert max(len(step) for step in steps) == 1  # only GPU 0 exists


def hot_and_rare(every: float = 2.0) -> Trace:
    """One GPU: "hot" called every `every` s for 20 minutes (each call 1 s), "rare" three
    times; they never fit together."""
    calls = [(i * every, "hot") for i in range(int(1200 / every))]
    calls += [(300.0, "rare"), (310.0, "rare"), (900.0, "rare")]
    calls.sort()
    return Trace(models=models("hot", "rare"),
                 calls=tuple(Call(i, m, arrival=a, service=1.0) for i, (a, m) in enumerate(calls)),
                 jobs=(), duration=1200.0, gpu_inventory={"local": (0,)},
                 gpu_memory={"local": GPU_MEMORY_GB})


def test_a_hot_model_is_not_evicted_for_a_rare_one_at_once_and_then_only_by_sleep():
    trace = hot_and_rare()
    ours_world = PlanPolicy(trace)
    ours = ours_world.run()
    lru = KeepAliveBaseline(trace).run()
    rare = [c.id for c in trace.calls if c.model == "rare"]
    # The rare caller waits: a swap would make the hot model's callers wait longer.
    assert ours.served[rare[0]].wait > 60.0
    evictions = [a for _, a in ours_world.actions if a.evicted_for == "rare"]
    assert evictions and all(a.kind in ("sleep", "drain") for a in evictions)
    assert all(a.then in ("", "sleep") for a in evictions)  # asleep, not stopped
    hot_waits = lambda r: sum(1 for s in r.served.values() if s.model == "hot" and s.wait > 0)  # noqa: E731
    # Ollama style drains the hot model for the rare one at once, each time, with a cold load.
    assert hot_waits(ours) < hot_waits(lru)
    assert summarize(ours).calls_cut == 0


def test_the_ttl_baseline_never_evicts_a_model_with_calls_in_flight():
    """Called every 0.5 s for 1 s each, the hot model always has a call in flight: the rare
    one waits until the hot one's calls stop and its TTL runs out."""
    result = TtlBaseline(hot_and_rare(every=0.5)).run()
    rare_waits = [s.wait for s in result.served.values() if s.model == "rare"]
    assert min(rare_waits) > 300.0
    assert max(rare_waits) > 1200.0 - 300.0


# ---------------------------------------------------------------- the Azure scenarios

@pytest.fixture(scope="module")
def azure_traces() -> AzureTraces:
    """The public traces, read once for the module. They lie in shared/ beside the checkout
    (CI copies it there): without them these tests fail, saying where they looked."""
    if not (AZURE_DIR / "azure-llm-2023-conv.csv").exists():
        pytest.fail(f"the Azure traces are not at {AZURE_DIR} (shared/traces beside the "
                    "checkout)")
    return AzureTraces()


def test_the_scenarios_are_built_the_same_every_time_with_every_model(azure_traces):
    for scenario in SCENARIOS:
        rows = scenario.build(azure_traces)
        assert rows == scenario.build(azure_traces), scenario.name  # seeded, not random
        assert {r["model"] for r in rows} == {m["id"] for m in MODELS_OF_SCENARIOS}
        assert 3000 <= max(float(r["timestamp"]) for r in rows) <= 3600, scenario.name


def test_the_idle_gaps_scenario_runs_every_call_and_job_in_every_policy(azure_traces,
                                                                        tmp_path):
    scenario = next(s for s in SCENARIOS if s.name == "idle-gaps")
    trace = load_trace(*write(scenario, azure_traces, tmp_path), gpus=1,
                       gpu_memory_gb=GPU_MEMORY_GB)
    assert trace.jobs and {c.model for c in trace.calls} == {m.id for m in trace.models}
    for result in simulate.run_all(trace):
        s = summarize(result)
        assert (s.unserved, s.jobs_unfinished, s.calls_cut) == (0, 0, 0), result.policy
