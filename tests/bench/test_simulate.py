"""Tests of `bench.simulate` on the synthetic day: structural facts of the simulated runs (every
call served once, no GPU given twice at any step, batch work done or counted late, the report)
on a short generated trace, and a hand-built trace where ours must wake a sleeping engine the
TTL baseline has either kept loaded or unloaded. Traces from files, GPU memory and the Azure
scenarios: `test_simulate_traces.py`."""

from __future__ import annotations

import pytest

from bench import simulate
from bench.sim_policies import POLICIES, KeepAliveBaseline, PlanPolicy, TtlBaseline
from bench.sim_report import render_run
from bench.sim_trace import Call, SimModel, Trace, generate_trace
from bench.sim_world import SimulationError, World

SHORT_HOURS = 2.0


@pytest.fixture(scope="module")
def short_trace() -> Trace:
    # Office hours, so all three models and some batch jobs show up within two hours.
    return generate_trace(seed=7, hours=SHORT_HOURS, start_hour=9.0)


@pytest.fixture(scope="module")
def short_runs(short_trace):
    """Each policy on the short trace, with the GPUs of every instance recorded at every step
    (by the test, not by the world's own check)."""
    held_per_step: dict[str, list[list[tuple[str, int]]]] = {}
    results = {}
    for policy in POLICIES:
        world = policy(short_trace)
        steps: list[list[tuple[str, int]]] = []
        account = world._account

        def recording_account(t, world=world, steps=steps, account=account):
            steps.append([(i.gpu_host, g) for i in world.instances.values() for g in i.gpus])
            account(t)

        world._account = recording_account
        results[policy.name] = world.run()
        held_per_step[policy.name] = steps
    return results, held_per_step


def test_short_trace_has_work_for_every_model(short_trace):
    assert {c.model for c in short_trace.calls} == {m.id for m in short_trace.models}
    assert short_trace.jobs


def test_every_realtime_call_is_served_exactly_once(short_trace, short_runs):
    results, _ = short_runs
    ids = [c.id for c in short_trace.calls]
    for result in results.values():
        assert result.unserved == 0, result.policy
        assert sorted(result.served) == ids, result.policy
        assert all(s.wait >= 0 for s in result.served.values())


def test_no_gpu_is_held_by_two_instances_at_any_step(short_runs):
    _, held_per_step = short_runs
    for name, steps in held_per_step.items():
        assert len(steps) >= SHORT_HOURS * 3600, name  # every step was seen
        for held in steps:
            assert len(held) == len(set(held)), name
            assert set(held) <= {("local", 0), ("local", 1)}, name


def test_the_world_refuses_a_gpu_given_twice(short_trace):
    world = World(short_trace)
    model = short_trace.models[0].id
    world.launch(model, 0.0, ("local", (0,)))
    with pytest.raises(SimulationError):
        world.launch(model, 0.0, ("local", (0,)))


def test_batch_lines_are_all_done_or_counted_late(short_trace, short_runs):
    results, _ = short_runs
    for result in results.values():
        summary = simulate.summarize(result)
        assert summary.jobs == len(short_trace.jobs)
        assert summary.jobs_on_time + summary.jobs_late + summary.jobs_unfinished == summary.jobs
        for state in result.jobs.values():
            if state.finished_at is None:
                assert state.remaining > 0
            else:
                assert state.remaining == 0
                assert state.finished_at >= state.job.submitted
        # The run goes on after the last arrival until the batch work is done.
        assert summary.jobs_unfinished == 0, result.policy


def test_report_has_the_three_policies_and_the_targets(short_trace, short_runs):
    results, _ = short_runs
    ordered = [results[p.name] for p in POLICIES]
    report = render_run(short_trace, ordered, "python -m bench.simulate --seed 7", 1.0)
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for policy in POLICIES:
        assert any(row.startswith(f"| {policy.name} |") for row in rows), policy.name
    assert "## Targets" in report
    assert report.count("**PASS**") + report.count("**FAIL**") == len(
        simulate.targets([simulate.summarize(r) for r in ordered]))


def test_main_writes_the_report(tmp_path, capsys):
    out = tmp_path / "simulate.md"
    assert simulate.main(["--seed", "2", "--hours", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Simulated synthetic day")
    assert "--seed 2 --hours 1" in text
    assert text in capsys.readouterr().out


# -- a hand-built trace: one model, called again after 200 s and after 400 s of idleness -------

LOAD, WAKE = 60.0, 2.0
MODEL = SimModel("m", load_seconds=LOAD, wake_seconds=WAKE)


def _idle_trace() -> Trace:
    first = Call(0, "m", arrival=10.0, service=2.0)
    # Ready at 70, the call ends at 72: idle from 72.
    second = Call(1, "m", arrival=72.0 + 200.0, service=2.0)
    # Ours: woken at 272, ready at 274, the call ends at 276. TTL: loaded all along, ends at 274.
    third = Call(2, "m", arrival=276.0 + 400.0, service=2.0)
    return Trace(models=(MODEL,), calls=(first, second, third), jobs=(), duration=700.0)


def test_called_again_after_200_s_ours_wakes_while_ttl_kept_it_loaded_idle():
    trace = _idle_trace()
    ours = PlanPolicy(trace).run()
    ttl = TtlBaseline(trace).run()

    # Ours slept after 120 s idle: the second call waits for a wake, not a cold start.
    assert ours.served[1].waited_for == "wake"
    assert ours.served[1].wait == pytest.approx(WAKE)
    # The TTL baseline still has it loaded after 200 s: no wait, but 200 s loaded and idle.
    assert ttl.served[1].waited_for == ""
    assert ttl.served[1].wait == 0.0
    # Idle spells: 200 s, then 300 s until the TTL unloads, and 300 s after the third call.
    assert ttl.gpu_seconds["idle"] >= 800.0 - 3
    # Ours: after each of the three calls, 120 s idle and up to one 5 s tick before it sleeps.
    assert ours.gpu_seconds["idle"] <= 3 * (120.0 + 5 + 1)
    assert ours.gpu_seconds["asleep"] > 0


def test_called_again_after_400_s_ours_wakes_while_ttl_cold_starts():
    trace = _idle_trace()
    ours = simulate.summarize(PlanPolicy(trace).run())
    runs = {p.name: p(trace).run() for p in (TtlBaseline, KeepAliveBaseline)}

    result = PlanPolicy(trace).run()
    assert result.served[2].waited_for == "wake"
    assert result.served[2].wait == pytest.approx(WAKE)
    assert (result.loads, result.wakes) == (1, 2)
    assert ours.cold_starts == 1  # only the very first call
    for name, run in runs.items():
        # Unloaded 300 s after the second call: the third one waits for a full load.
        assert run.served[2].waited_for == "load", name
        assert run.served[2].wait == pytest.approx(LOAD), name
        assert run.loads == 2, name
        assert simulate.summarize(run).cold_starts == 2, name
