"""`/metrics` through the real stack: 2 gunicorn workers and Celery workers, one multiprocess dir.

The counters are parsed with prometheus_client's own parser and must match the traffic sent, per
model, route and status, whichever web worker served each call.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import urllib3
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKENS, raw_post, warm
from tests.harness import wait_for

MODEL = "sim/metrics"


def scrape(stack, token: str = "monitor") -> dict[tuple[str, tuple], float]:
    response = urllib3.request("GET", f"{stack.base_url}/metrics",
                               headers={"Authorization": f"Bearer {TOKENS[token]}"}, timeout=10)
    assert response.status == 200, response.data
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.data.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _fresh_connection_post(stack, path: str, body: dict):
    # A new connection per call: the kernel hands each to whichever web worker accepts first.
    return urllib3.request("POST", f"{stack.base_url}{path}", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {TOKENS['realtime']}",
                                    "Connection": "close"}, retries=False)


def _requests_per_web_worker(stack, model: str, route: str) -> dict[int, float]:
    """gateway_requests_total of `model` on `route` (status 200) in each web worker's file."""
    master = psutil.Process(stack.procs["web"].pid)
    web_pids = {child.pid for child in master.children()}
    counts: dict[int, float] = {}
    for path in Path(stack.env["PROMETHEUS_MULTIPROC_DIR"]).glob("counter_*.db"):
        pid = int(path.stem.split("_", 1)[1].split("@")[0])  # counter_<pid>@<host>
        if pid not in web_pids:
            continue
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, *_ = json.loads(key)
            if (sample == "gateway_requests_total" and labels.get("model") == model
                    and labels.get("route") == route and labels.get("status") == "200"):
                counts[pid] = counts.get(pid, 0) + count
    return counts


def test_metrics_needs_a_monitor_key_as_bearer(stack):
    url = f"{stack.base_url}/metrics"
    assert urllib3.request("GET", url).status == 401
    realtime = urllib3.request("GET", url,
                               headers={"Authorization": f"Bearer {TOKENS['realtime']}"})
    assert realtime.status == 403
    assert realtime.json()["error"]["code"] == "insufficient_scope"
    # ?key= is for the dashboard's data API only.
    assert urllib3.request("GET", f"{url}?key={TOKENS['monitor']}").status == 401
    assert urllib3.request("GET", f"{stack.base_url}/v1/models?key={TOKENS['realtime']}"
                           ).status == 401


def test_counters_match_the_traffic_across_two_web_workers(stack, registry):
    warm(stack, MODEL)
    before = scrape(stack)
    sent = 0
    stream_sent = 0
    # Rounds of concurrent calls on fresh connections until both web workers have served some.
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            statuses = list(pool.map(
                lambda i: _fresh_connection_post(
                    stack, "/v1/completions",
                    {"model": MODEL, "prompt": f"count {i}", "max_tokens": 3}).status,
                range(10)))
            assert statuses == [200] * 10
            sent += 10
            if len(_requests_per_web_worker(stack, MODEL, "/v1/completions")) >= 2:
                break
        streams = list(pool.map(
            lambda i: _fresh_connection_post(
                stack, "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": f"s{i}"}],
                 "max_tokens": 4, "stream": True}),
            range(6)))
    assert [r.status for r in streams] == [200] * 6
    assert all(r.data.rstrip().endswith(b"data: [DONE]") for r in streams)
    stream_sent = 6
    unknown = raw_post(stack, "/v1/completions", {"model": "no/such", "prompt": "x"})
    assert unknown.status == 404
    bad_key = raw_post(stack, "/v1/completions", {"model": MODEL, "prompt": "x"}, token="nope")
    assert bad_key.status == 401

    per_worker = _requests_per_web_worker(stack, MODEL, "/v1/completions")
    assert len(per_worker) == 2, per_worker  # both gunicorn workers served and counted

    after = scrape(stack)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gateway_requests_total", model=MODEL, route="/v1/completions",
                 status="200") == sent
    assert sum(per_worker.values()) >= sent
    assert delta("gateway_requests_total", model=MODEL, route="/v1/chat/completions",
                 status="200") == stream_sent
    assert delta("gateway_requests_total", model="", route="/v1/completions", status="404") == 1
    assert delta("gateway_requests_total", model="", route="/v1/completions", status="401") == 1
    assert delta("gateway_request_duration_seconds_count", model=MODEL,
                 route="/v1/completions") == sent
    # Streams are timed when their last byte is relayed, time to first token with the first.
    assert delta("gateway_request_duration_seconds_count", model=MODEL,
                 route="/v1/chat/completions") == stream_sent
    assert delta("gateway_time_to_first_token_seconds_count", model=MODEL) == stream_sent
    ttft_sum = delta("gateway_time_to_first_token_seconds_sum", model=MODEL)
    assert 0.03 * stream_sent <= ttft_sum < 5 * stream_sent  # the engine's ttft is 30 ms

    # The start of the engine was counted by the control worker, with its duration.
    assert value(after, "gateway_cold_starts_total", model=MODEL, kind="cold") == 1
    assert value(after, "gateway_cold_start_duration_seconds_count", model=MODEL,
                 kind="cold") == 1
    assert 0.3 <= value(after, "gateway_cold_start_duration_seconds_sum", model=MODEL,
                        kind="cold") < 15

    # Read from Redis when scraped.
    assert value(after, "gateway_redis_up") == 1
    assert value(after, "gateway_runtimes", model=MODEL, engine="sim", state="ready") == 1
    assert {p for (name, labels) in after if name == "gateway_batch_queue_messages"
            for k, p in labels} == {str(p) for p in range(10)}
    for queue in ("batch", "control", "downloads"):
        assert ("gateway_queue_messages", (("queue", queue),)) in after


def test_batch_lines_are_counted_in_the_batch_worker(stack):
    warm(stack, MODEL)
    before = scrape(stack)
    submitted = raw_post(stack, "/v1/batch/completions",
                         {"model": MODEL, "prompt": "one line", "max_tokens": 2}, token="batch")
    assert submitted.status == 202
    status_url = f"{stack.base_url}{submitted.json()['status_url']}"

    def finished():
        job = urllib3.request("GET", status_url,
                              headers={"Authorization": f"Bearer {TOKENS['batch']}"}).json()
        return job["status"] in ("succeeded", "failed") and job

    assert wait_for(finished, 30, interval=0.2, what="batch completion")["status"] == "succeeded"
    # The worker counts the line just after storing it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = scrape(stack)
        done = (value(after, "gateway_batch_lines_total", model=MODEL, outcome="completed")
                - value(before, "gateway_batch_lines_total", model=MODEL, outcome="completed"))
        if done >= 1:
            break
        time.sleep(0.2)
    assert done == 1
    assert value(after, "gateway_batch_lines_total", model=MODEL, outcome="failed") == value(
        before, "gateway_batch_lines_total", model=MODEL, outcome="failed")
