"""What this web worker sends to its engines, reported to the registry about once a second.

The proxy counts calls in flight, last use per instance and arrivals per model in memory (no
Redis on the hot path); a background thread (a greenlet under gevent) writes them in one
pipelined round trip. The autoscaler reads them to find idle instances and busy models.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from runtimes.registry import RuntimeRegistry
from services.metrics import tokens_counted
from services.timeseries import SeriesRecorder
from services.usage_ledger import UsageKey, UsageLedger

log = logging.getLogger(__name__)


class UsageTracker:
    """`series` (the dashboard's chart series) is written with each report, and once a bucket
    the queue depths `sample_queues` returns."""

    def __init__(self, registry: RuntimeRegistry, series: SeriesRecorder | None = None,
                 sample_queues: Callable[[], dict[str, int]] | None = None,
                 interval: float = 1.0, ledger: UsageLedger | None = None):
        self.registry = registry
        self.ledger = ledger
        self._tokens: dict[UsageKey, list[int]] = {}
        self.series = series
        self.sample_queues = sample_queues
        self.interval = interval
        self.inflight: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._arrivals: dict[str, int] = {}
        self._changed: set[str] = set()
        self._served: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def arrived(self, model: str) -> None:
        self._arrivals[model] = self._arrivals.get(model, 0) + 1
        self._ensure_reporter()

    def begin(self, instance_id: str, model: str | None = None) -> None:
        now = time.time()
        self.inflight[instance_id] = self.inflight.get(instance_id, 0) + 1
        self._last_used[instance_id] = now
        self._changed.add(instance_id)
        if model is not None:
            self._served[model] = now

    def end(self, instance_id: str) -> None:
        self.inflight[instance_id] = max(0, self.inflight.get(instance_id, 0) - 1)
        self._last_used[instance_id] = time.time()
        self._changed.add(instance_id)

    def count(self, usage_key: UsageKey, prompt: int, completion: int) -> None:
        """One call's usage, written with the next report (services.usage_ledger)."""
        figures = self._tokens.get(usage_key)
        if figures is None:
            figures = self._tokens[usage_key] = [0, 0, 0]
        figures[0] += 1
        figures[1] += prompt
        figures[2] += completion

    def start(self) -> None:
        """Start reporting now (gunicorn's post_worker_init), not with the first call."""
        self._ensure_reporter()

    def _ensure_reporter(self) -> None:
        # Started on first use, in the process that serves: never before a fork.
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="usage-reporter", daemon=True)
        self._thread.start()

    def flush(self) -> None:
        last_used, self._last_used = self._last_used, {}
        arrivals, self._arrivals = self._arrivals, {}
        served, self._served = self._served, {}
        changed, self._changed = self._changed, set()
        tokens, self._tokens = self._tokens, {}
        inflight = {i: self.inflight.get(i, 0) for i in changed | {
            i for i, n in self.inflight.items() if n > 0
        }}
        ledger = self.ledger
        try:
            self.registry.report_usage(
                self.worker_id, last_used, inflight, arrivals, served=served,
                extra=(lambda pipe: ledger.write(pipe, tokens, time.time()))
                if ledger is not None and tokens else None)
            if tokens:
                tokens_counted(tokens)
        except redis.RedisError as exc:
            log.warning("usage report failed, will retry: %s", exc)
            for usage_key, figures in tokens.items():
                kept = self._tokens.setdefault(usage_key, [0, 0, 0])
                for index, value in enumerate(figures):
                    kept[index] += value
            for model, count in arrivals.items():
                self._arrivals[model] = self._arrivals.get(model, 0) + count
            for instance_id, at in last_used.items():
                self._last_used.setdefault(instance_id, at)
            self._changed |= changed
        for instance_id in changed:
            if self.inflight.get(instance_id) == 0:
                del self.inflight[instance_id]
        if self.series is not None:
            self.series.flush(sample_queues=self.sample_queues)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()
