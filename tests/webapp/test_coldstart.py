"""Cold starts and scale to zero through the real stack and real sim engine processes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtimes.registry import READY
from tests.conftest import raw_post, ready_records, warm
from tests.harness import wait_for


def _complete(stack, model, **kwargs):
    return raw_post(stack, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4},
                    **kwargs)


def test_cold_call_is_503_with_retry_after_then_one_engine_then_200(stack, registry):
    model = "sim/cold"
    assert not registry.for_model(model)
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: _complete(stack, model), range(20)))
    assert {r.status for r in responses} == {503}
    for response in responses:
        body = json.loads(response.data)["error"]
        assert body["code"] == "model_starting"
        assert body["type"] == "server_error"
        # Catalog estimate 3 s for a never-started model.
        assert 1 <= int(response.headers["Retry-After"]) <= 3
    # Exactly one engine, however many callers in however many web workers.
    time.sleep(1.0)
    assert len(registry.for_model(model)) == 1
    assert len(stack.engine_pids()) == len(registry.all())
    wait_for(lambda: ready_records(registry, model), 20, what="sim/cold ready")
    assert _complete(stack, model).status == 200
    assert len(registry.for_model(model)) == 1
    # The observed start time now drives the estimate.
    durations = registry.start_durations(model)
    assert len(durations) == 1 and 2.5 <= durations[0] < 15


def test_hold_setting_answers_200_after_waiting(stack, registry):
    started = time.monotonic()
    response = _complete(stack, "sim/hold")
    assert response.status == 200, response.data
    assert time.monotonic() - started >= 1.0  # the engine's load time
    assert ready_records(registry, "sim/hold")


def test_idle_engine_is_stopped_and_restarted_on_demand(stack, registry):
    model = "sim/idle"
    warm(stack, model)
    [record] = ready_records(registry, model)
    pid_files = set(stack.state_dir.glob("*.json"))
    assert any(record.id in p.name for p in pid_files)
    # idle_timeout_seconds is 2 for this model; the tick runs every 0.5 s.
    wait_for(lambda: not registry.for_model(model), 15, what="idle stop")
    assert not (stack.state_dir / f"{record.id}.json").exists()
    decisions = registry.recent_decisions(200)
    assert any(d["action"] == "drain" and d["instance"] == record.id and "idle" in d["reason"]
               for d in decisions)
    assert _complete(stack, model).status == 503
    warm(stack, model)


def test_calls_in_flight_keep_an_engine_from_idle_stop(stack, registry):
    model = "sim/idle"
    warm(stack, model)
    [record] = ready_records(registry, model)
    deadline = time.monotonic() + 4  # twice the idle timeout
    while time.monotonic() < deadline:
        assert _complete(stack, model).status == 200
        time.sleep(0.3)
    assert registry.get(record.id).state == READY


def test_engine_that_cannot_start_is_marked_failed_after_three_tries(stack, registry):
    model = "sim/broken"
    response = _complete(stack, model)
    assert response.status == 503
    assert json.loads(response.data)["error"]["code"] == "model_starting"

    def three_failures():
        _complete(stack, model)  # keep demand fresh so the autoscaler retries with backoff
        return registry.failed_starts().get(model, 0) >= 3

    wait_for(three_failures, 30, interval=0.3, what="three failed starts")
    response = _complete(stack, model)
    assert response.status == 503
    error = json.loads(response.data)["error"]
    assert error["code"] == "model_failed"
    assert "exited with code 2" in error["message"]
    failure = registry.last_failure(model)
    assert failure["exit_code"] == 2
    assert "fail" in failure["last_logs"].lower()
    time.sleep(1.5)
    assert registry.failed_starts()[model] == 3  # no more tries until an operator resets it


@pytest.mark.parametrize("stream", [False, True])
def test_stale_route_to_a_stopped_engine_becomes_a_cold_start(stack, registry, stream):
    model = "sim/restart"
    warm(stack, model)
    [record] = ready_records(registry, model)
    # Stop the engine behind the gateway's back, as an operator or the OOM killer might.
    import os
    import signal

    os.killpg(json.loads((stack.state_dir / f"{record.id}.json").read_text())["pid"],
              signal.SIGKILL)
    wait_for(lambda: not any(r.id == record.id for r in registry.for_model(model)), 10,
             what="dead engine noticed")
    response = raw_post(stack, "/v1/completions",
                        {"model": model, "prompt": "hi", "max_tokens": 2, "stream": stream})
    assert response.status == 503
    assert json.loads(response.data)["error"]["code"] == "model_starting"
    warm(stack, model)
    registry.reset_model(model)


def _stop_via_control_plane(stack, instance_id: str) -> None:
    """Stop an instance as an operator would, through a control plane of the stack's own."""
    from config.settings import load_settings
    from runtimes.factory import build_control_plane

    env = {k: v for k, v in stack.env.items() if k.isupper()}
    build_control_plane(load_settings(env)).stop_instance(instance_id, "stopped by the test")


def test_retry_after_is_calibrated_by_the_observed_start(stack, registry):
    model = "sim/calibrate"  # loads in 3 s; the catalog guesses 30 s
    first = _complete(stack, model)
    assert int(first.headers["Retry-After"]) == 30
    warm(stack, model)
    [record] = ready_records(registry, model)
    # A served call clears the model's demand (the web workers report it within a second);
    # stopped before that, a stale "wanted" would rightly start it again.
    wait_for(lambda: model not in registry.demand(), 5, what="the demand to be cleared")
    _stop_via_control_plane(stack, record.id)
    assert not registry.for_model(model)

    response = _complete(stack, model)
    asked = time.monotonic()
    promised = int(response.headers["Retry-After"])
    wait_for(lambda: _complete(stack, model).status == 200, 30, interval=0.05,
             what="the second start")
    waited = time.monotonic() - asked
    assert abs(promised - waited) <= 0.25 * waited, (promised, waited)


def test_idle_engine_sleeps_and_wakes_in_about_a_second(stack, registry):
    model = "sim/sleepy"  # sleeps after 1 s idle; loads in 2 s, wakes in 0.5 s
    warm(stack, model)
    [record] = ready_records(registry, model)
    wait_for(lambda: registry.get(record.id).state == "sleeping", 10, what="sleep")
    assert any(d["action"] == "sleep" and d["instance"] == record.id
               for d in registry.recent_decisions(100))

    response = _complete(stack, model)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) <= 2
    error = json.loads(response.data)["error"]
    assert error["code"] == "model_waking" and "waking up" in error["message"]
    asked = time.monotonic()
    wait_for(lambda: _complete(stack, model).status == 200, 10, interval=0.05, what="wake-up")
    assert time.monotonic() - asked < 2.0  # well under the 2 s cold load
    [woken] = ready_records(registry, model)
    assert woken.id == record.id  # the same engine, woken, not a new start
    wakes = registry.start_durations(model, kind="wake")
    assert len(wakes) == 1 and 0.5 <= wakes[0] < 2.0
