"""What a realtime call gets when its model has no ready engine: a start, and an honest answer.

The call records demand and asks the control plane for a start (deduplicated in Redis, so many
callers across many workers cause one start). By default it then answers 503 with a Retry-After
estimated from this model's observed start times; an operator may instead hold the call up to a
number of seconds for the engine to become ready.
"""

from __future__ import annotations

import math
import time

from runtimes.catalog import ModelSpec
from runtimes.policy import MAX_FAILED_STARTS
from runtimes.registry import SLEEPING, STARTING, RuntimeRecord, RuntimeRegistry
from webapp.context import gateway
from webapp.errors import APIError

HOLD_POLL_SECONDS = 0.25


# Before a model's first wake-up is measured: vLLM wakes from level-1 sleep in about a second.
DEFAULT_WAKE_SECONDS = 2.0


def estimate_start_seconds(registry: RuntimeRegistry, spec: ModelSpec, default: float,
                           records: list[RuntimeRecord], scale=None) -> float:
    """Median of this model's recent starts (or wake-ups, when one of its engines sleeps);
    else the catalog's figure (else the default), through `scale(spec, seconds)` if given."""
    if any(r.state == SLEEPING for r in records):
        return registry.median_start_seconds(spec.id, kind="wake") or DEFAULT_WAKE_SECONDS
    observed = registry.median_start_seconds(spec.id)
    if observed is not None:
        return observed
    base = spec.expected_start_seconds or default
    return scale(spec, base) if scale is not None else base


def retry_after_seconds(records: list[RuntimeRecord], estimate: float, now: float) -> int:
    starting = [r for r in records if r.state == STARTING]
    remaining = estimate
    if starting:
        # The start under way has already used part of the estimate.
        remaining = estimate - (now - min(r.created_at for r in starting))
        if remaining < 1:
            # Overdue: the engine is slower than it was; ask again soon rather than give up.
            remaining = min(5.0, max(1.0, estimate * 0.1))
    return max(1, math.ceil(remaining))


def await_runtime(spec: ModelSpec) -> RuntimeRecord:
    """Return a ready instance of `spec` within the hold time, or raise the 503 that says when."""
    gw = gateway()
    settings = gw.services.settings
    registry: RuntimeRegistry = gw.services.registry
    router = gw.services.router

    failures = registry.failed_starts().get(spec.id, 0)
    if failures >= MAX_FAILED_STARTS:
        failure = registry.last_failure(spec.id) or {}
        raise APIError(
            503,
            f"The model '{spec.id}' failed to start {failures} times in a row "
            f"({failure.get('reason', 'unknown reason')}); an operator must reset it.",
            type="server_error",
            code="model_failed",
            headers={"Retry-After": "60"},
        )

    registry.note_demand(spec.id)
    gw.services.request_start(spec.id)

    hold = spec.cold_start_hold_seconds
    if hold is None:
        hold = settings.cold_start_hold_seconds
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        time.sleep(HOLD_POLL_SECONDS)
        router.invalidate()
        record = router.pick(spec.id, gw.usage.inflight)
        if record is not None:
            return record

    records = registry.for_model(spec.id)
    # Weights in RAM shorten a first start; a download under way comes before the start.
    weights = gw.services.weights
    estimate = estimate_start_seconds(registry, spec, settings.default_start_seconds, records,
                                      weights.pages.scale_cold_estimate)
    download = math.ceil(weights.downloads.download_wait_seconds(spec))
    seconds = retry_after_seconds(records, estimate, time.time()) + download
    if not download and any(r.state == SLEEPING for r in records) and not any(
            r.state == STARTING for r in records):
        # An asleep engine is being woken (seconds, not a cold start's minutes): say so.
        raise APIError(
            503, f"The model '{spec.id}' is waking up; retry in about {seconds} s.",
            type="server_error", code="model_waking", headers={"Retry-After": str(seconds)},
        )
    raise APIError(
        503,
        f"The model '{spec.id}' is starting{' (downloading its weights)' if download else ''}; "
        f"retry in about {seconds} s.",
        type="server_error",
        code="model_starting",
        headers={"Retry-After": str(seconds)},
    )
