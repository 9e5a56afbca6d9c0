"""Prometheus metrics of the web workers, and `/metrics` (scope `monitor`, as Bearer).

Web workers count requests, latency and time to first token here; the control worker's engine
starts and the batch workers' lines are counted in `services.metrics`, which also sets up the
multiprocess mode whose files `/metrics` sums. What lives in Redis anyway (runtime states, queue
depths, downloads) is read when scraped, not mirrored.
"""

from __future__ import annotations

import logging
import time

import redis
from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from services.metrics import LOCAL, MULTIPROC_DIR, child
from tasks.broker import BATCH_QUEUE, api_priority
from webapp import overview
from webapp.apidoc import documented
from webapp.auth import require_scope
from webapp.context import Gateway, gateway, services

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "gateway_requests", "HTTP requests answered, by model (realtime calls), route and status.",
    ["model", "route", "status"], registry=LOCAL)
LATENCY = Histogram(
    "gateway_request_duration_seconds",
    "Time from arrival to the end of the answer, of answers with status below 400 "
    "(a stream: to its last byte).",
    ["model", "route"], buckets=LATENCY_BUCKETS, registry=LOCAL)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Streamed realtime calls: time from arrival to the engine's first bytes.",
    ["model"], buckets=LATENCY_BUCKETS, registry=LOCAL)


# -- counting --------------------------------------------------------------------

def _start_clock() -> None:
    g.started = time.perf_counter()


def _count_answer(response: Response) -> Response:
    model = g.get("model", "")
    rule = request.url_rule
    # Unmatched paths share one label: a scanner must not mint a series per URL.
    route = rule.rule if rule is not None else "unmatched"
    status = response.status_code
    child(REQUESTS, model, route, status).inc()
    if g.get("stream_timer") is None:  # a relayed stream is timed when it ends
        started = g.get("started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        if status < 400:
            child(LATENCY, model, route).observe(seconds)
        if model:
            services().series.request(model, seconds, None, status)
    return response


class StreamTimer:
    """Times a relayed stream of a realtime call: first bytes (`first`) and end (`end`).

    Made in the request; `first` and `end` run while the stream is relayed, after it.
    """

    __slots__ = ("first_at", "model", "route", "series", "started")

    def __init__(self, model: str):
        self.model = model
        self.route = request.url_rule.rule
        self.started = g.get("started") or time.perf_counter()
        self.first_at: float | None = None
        self.series = services().series
        g.stream_timer = self

    def first(self) -> None:
        self.first_at = time.perf_counter()

    def end(self, outcome: str) -> None:
        seconds = time.perf_counter() - self.started
        ttft = None if self.first_at is None else self.first_at - self.started
        if outcome == "complete":
            child(LATENCY, self.model, self.route).observe(seconds)
            if ttft is not None:
                child(TTFT, self.model).observe(ttft)
        # 499 (nginx's "client closed request"): counted as a call, neither error nor latency.
        status = {"complete": 200, "engine_error": 502}.get(outcome, 499)
        self.series.request(self.model, seconds, ttft, status)


# -- what Redis knows, read when scraped -------------------------------------------------------

class StateCollector:
    """Runtime states, failures, queue depths, jobs and downloads, read from Redis per scrape."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def collect(self):
        up = GaugeMetricFamily("gateway_redis_up", "1 if Redis answered this scrape.")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            log.warning("/metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self):
        gw = self.gw
        registry = gw.services.registry
        now = time.time()
        records = registry.all()
        inflight = registry.inflight([r.id for r in records], now)
        states = GaugeMetricFamily("gateway_runtimes", "Engine instances by model and state.",
                                   labels=["model", "engine", "state"])
        calls = GaugeMetricFamily("gateway_runtime_inflight_calls",
                                  "Realtime calls in flight per model (reported by web workers).",
                                  labels=["model"])
        counts: dict[tuple[str, str, str], int] = {}
        per_model: dict[str, int] = {}
        for record in records:
            key = (record.model, record.engine, record.state)
            counts[key] = counts.get(key, 0) + 1
            per_model[record.model] = per_model.get(record.model, 0) + inflight.get(record.id, 0)
        for labels, count in sorted(counts.items()):
            states.add_metric(list(labels), count)
        for model, count in sorted(per_model.items()):
            calls.add_metric([model], count)
        yield states
        yield calls

        failed = GaugeMetricFamily("gateway_failed_starts",
                                   "Failed starts in a row per model (3: failed until reset).",
                                   labels=["model"])
        for model, count in sorted(registry.failed_starts().items()):
            failed.add_metric([model], count)
        yield failed

        pending = GaugeMetricFamily("gateway_batch_pending_lines",
                                    "Batch lines waiting per model.", labels=["model"])
        for model, count in sorted(gw.services.jobs.pending().items()):
            pending.add_metric([model], count)
        yield pending

        lengths = gw.broker.queue_lengths()
        queues = GaugeMetricFamily("gateway_queue_messages",
                                   "Celery messages waiting in Redis per queue.", labels=["queue"])
        for queue, by_step in lengths.items():
            queues.add_metric([queue], sum(by_step.values()))
        yield queues
        by_priority = GaugeMetricFamily(
            "gateway_batch_queue_messages",
            "Celery messages waiting in queue batch per API priority (9 runs first).",
            labels=["priority"])
        for step, length in sorted(lengths[BATCH_QUEUE].items()):
            by_priority.add_metric([str(api_priority(step))], length)
        yield by_priority

        jobs = GaugeMetricFamily("gateway_open_jobs", "Batch jobs not yet in a final state.")
        jobs.add_metric([], gw.services.jobs.open_count())
        yield jobs

        yield from overview.download_metrics(gw)


def scrape(gw: Gateway) -> bytes:
    if MULTIPROC_DIR:
        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted, path=MULTIPROC_DIR)
    else:
        counted = LOCAL
    state = CollectorRegistry(auto_describe=False)
    state.register(StateCollector(gw))
    return generate_latest(counted) + generate_latest(state)


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@require_scope("monitor")
@documented("Prometheus metrics", content_type="text/plain")
def metrics():
    return Response(scrape(gateway()), content_type=CONTENT_TYPE_LATEST)


def register_metrics(app: Flask) -> None:
    """Count every answer, and serve /metrics."""
    app.before_request(_start_clock)
    app.after_request(_count_answer)
    app.register_blueprint(bp)
