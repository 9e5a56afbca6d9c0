"""The Prometheus counters every process of the stack may update, web and Celery workers.

With PROMETHEUS_MULTIPROC_DIR set (make run and the test stack set it, to a fresh directory,
before any process starts), prometheus_client runs in multiprocess mode: each process's counters
and histograms are mmap'd files, cheap to update (no Redis, no lock across processes), summed at
scrape time by `/metrics` (webapp.metrics); gunicorn's `child_exit` hook marks dead workers.
Without it (one process, a test client) the values live in this process's `LOCAL` registry.
The control worker counts engine starts here, the batch workers batch lines; the web's own
request counters are in webapp.metrics.
"""

from __future__ import annotations

import os
import socket

from prometheus_client import CollectorRegistry, Counter, Histogram, values

from services.timeseries import SeriesRecorder

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
_HOST = socket.gethostname()
_identity: list = [None, ""]


def process_identifier() -> str:
    """`<pid>@<host>`, the name of this process's files: containers sharing the directory (one
    volume for web and workers) each number their processes from 1, so a pid alone collides."""
    pid = os.getpid()
    if _identity[0] != pid:  # asked on every update: build the string only after a fork
        _identity[0], _identity[1] = pid, f"{pid}@{_HOST}"
    return _identity[1]


if MULTIPROC_DIR:
    # The values' files are created with the first sample; the directory must be there by then.
    os.makedirs(MULTIPROC_DIR, exist_ok=True)
    values.ValueClass = values.MultiProcessValue(process_identifier)

# This process's metrics (single-process mode); in multiprocess mode the files are read instead.
LOCAL = CollectorRegistry(auto_describe=True)

START_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)

COLD_STARTS = Counter(
    "gateway_cold_starts", "Engines that became ready: kind cold (started) or wake (from sleep).",
    ["model", "kind"], registry=LOCAL)
COLD_START_SECONDS = Histogram(
    "gateway_cold_start_duration_seconds", "How long engines took to become ready.",
    ["model", "kind"], buckets=START_BUCKETS, registry=LOCAL)
BATCH_LINES = Counter(
    "gateway_batch_lines", "Batch lines finished by the batch workers: completed or failed.",
    ["model", "outcome"], registry=LOCAL)


# The labelled children, looked up once: labels() takes a lock and builds its key every call.
# Bounded: models come from the catalog, routes from the URL map, statuses from HTTP.
_children: dict[tuple, object] = {}


def child(metric, *labels):
    """`metric.labels(*labels)`, made once."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


TOKENS = Counter(
    "gateway_tokens",
    "Tokens the engines reported, by key name (never the token), model, kind (realtime, "
    "batch, eval) and type (prompt, completion).",
    ["key", "model", "kind", "type"], registry=LOCAL)


def tokens_counted(counts) -> None:
    """Count `counts` ({UsageKey: [requests, prompt, completion]}) in gateway_tokens."""
    for usage_key, (_, prompt, completion) in counts.items():
        for kind, value in (("prompt", prompt), ("completion", completion)):
            if value:
                child(TOKENS, usage_key.key, usage_key.model, usage_key.kind, kind).inc(value)


def batch_line_finished(model: str, ok: bool) -> None:
    child(BATCH_LINES, model, "completed" if ok else "failed").inc()


def engine_started(series: SeriesRecorder):
    """The control plane's `on_started(model, kind, seconds)`: counted here and charted."""

    def on_started(model: str, kind: str, seconds: float) -> None:
        COLD_STARTS.labels(model, kind).inc()
        COLD_START_SECONDS.labels(model, kind).observe(seconds)
        series.engine_started(model, kind, seconds)

    return on_started
