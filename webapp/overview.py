"""What the dashboard shows, read from Redis: runtimes and GPUs, failures, queues, jobs, downloads.

`overview(gw)` builds one JSON-ready snapshot from the app's services (`webapp.context`); the
dashboard polls it every few seconds. `queue_sample(gw)` is the part the chart series samples.
Everything is read, nothing changed; no Flask request is needed, so the usage reporter can call it.
"""

from __future__ import annotations

import time

from prometheus_client.core import GaugeMetricFamily

from jobs.store import JobStore
from runtimes.policy import MAX_FAILED_STARTS
from runtimes.registry import READY, SLEEPING, STARTING, RuntimeRecord
from runtimes.upstreams import health as upstream_health
from tasks.broker import BATCH_QUEUE, BrokerStats, api_priority
from webapp.coldstart import estimate_start_seconds
from webapp.context import Gateway

# Keep the page light: the newest jobs of each kind, the newest decisions.
JOBS_SHOWN = 15
DECISIONS_SHOWN = 40
LOG_LINES_SHOWN = 20
# Finished downloads and primings stay on the page this long.
RECENT_DOWNLOAD_SECONDS = 3600


USAGE_SHOWN_SECONDS = 24 * 3600


def queue_sample(jobs: JobStore, broker: BrokerStats) -> dict[str, int]:
    """Queue depths for the chart series: batch lines per model, `batch` messages per priority."""
    sample = {f"pending|{model}": count for model, count in jobs.pending().items()}
    for priority, length in broker.batch_by_priority().items():
        sample[f"celery|{priority}"] = length
    return sample


# -- the snapshot ------------------------------------------------------------------------------

def overview(gw: Gateway, now: float | None = None, project: str | None = None) -> dict:
    """What the dashboard shows; `usage` is the last day's of `project` only (the monitor
    key's), by hour, per key and per model."""
    now = time.time() if now is None else now
    registry = gw.services.registry
    records = registry.all()
    inflight = registry.inflight([r.id for r in records], now)
    last_used = registry.last_used()
    failed = registry.failed_starts()
    pending = gw.services.jobs.pending()
    runtimes = [_runtime(gw, r, records, inflight, last_used, now) for r in records]
    runtimes.sort(key=lambda r: (r["model"], r["created_at"]))
    settings = gw.services.settings
    return {
        "now": now,
        "gpus": _gpus(gw.services.control.gpu_inventory, runtimes),
        "runtimes": runtimes,
        "models": _models(gw, records, failed, pending, registry.demand(), now),
        "queues": _queues(gw, pending),
        "jobs": _jobs(gw.services.jobs),
        "downloads": _downloads(gw),
        "decisions": registry.recent_decisions(DECISIONS_SHOWN),
        "web_workers": _live_web_workers(registry, now),
        "flower": {"url": settings.flower_url, "port": settings.flower_port},
        "usage": _usage(gw, now, project),
        "upstreams": _upstreams(gw),
    }


def _upstreams(gw: Gateway) -> list[dict]:
    """The catalog's upstreams (engines run by others) and their last health check."""
    checked = upstream_health(gw.services.registry)
    return [{"model": spec.id, "base_url": spec.upstream_url,
             "ok": checked.get(spec.id, {}).get("ok"),
             "error": checked.get(spec.id, {}).get("error") or None,
             "checked_at": checked.get(spec.id, {}).get("at")}
            for spec in gw.services.catalog if spec.upstream_url is not None]


def _usage(gw: Gateway, now: float, project: str | None) -> dict:
    if project is None:
        return {"by_key": [], "by_model": []}
    ledger = gw.services.usage
    start = now - USAGE_SHOWN_SECONDS
    return {group: sorted(ledger.query(start, now, "hour", name, project=project),
                          key=lambda row: -row["start"])  # the newest hour first
            for group, name in (("by_key", "key"), ("by_model", "model"))}


def _runtime(gw: Gateway, record: RuntimeRecord, records: list[RuntimeRecord],
             inflight: dict[str, int], last_used: dict[str, float], now: float) -> dict:
    view = {
        "id": record.id, "model": record.model, "engine": record.engine,
        "backend": record.backend, "state": record.state, "reason": record.reason,
        "endpoint": record.endpoint if record.port else None,
        "gpu_host": record.gpu_host, "gpus": list(record.gpus),
        "created_at": record.created_at, "state_since": record.state_since,
        "ready_at": record.ready_at, "inflight": inflight.get(record.id, 0),
        "sleeping": record.state == SLEEPING,
        "uptime_seconds": None, "idle_seconds": None,
        "eta_seconds": None, "estimate_seconds": None, "elapsed_seconds": None,
        "exit_code": record.exit_code, "last_logs": _tail(record.last_logs),
    }
    if record.ready_at is not None and record.state not in (STARTING,):
        view["uptime_seconds"] = round(now - record.ready_at, 1)
        active = max(last_used.get(record.id, 0.0), record.ready_at)
        view["idle_seconds"] = round(max(0.0, now - active), 1)
    if record.state == STARTING:
        spec = gw.services.catalog.get(record.model)
        elapsed = now - record.created_at
        view["elapsed_seconds"] = round(elapsed, 1)
        if spec is not None:
            same_model = [r for r in records if r.model == record.model]
            estimate = estimate_start_seconds(gw.services.registry, spec,
                                              gw.services.settings.default_start_seconds,
                                              same_model)
            view["estimate_seconds"] = round(estimate, 1)
            view["eta_seconds"] = round(estimate - elapsed, 1)
    return view


def _tail(text: str | None, lines: int = LOG_LINES_SHOWN) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def _gpus(inventory: dict[str, tuple[int, ...]], runtimes: list[dict]) -> list[dict]:
    """Each GPU of the inventory with the runtime that holds it (None: free)."""
    holders = {}
    for runtime in runtimes:
        for gpu in runtime["gpus"]:
            holders[(runtime["gpu_host"], gpu)] = runtime
    gpus = []
    for host, ids in sorted(inventory.items()):
        for gpu in ids:
            holder = holders.get((host, gpu))
            gpus.append({"host": host, "gpu": gpu,
                         "holder": None if holder is None else {
                             k: holder[k] for k in ("id", "model", "engine", "state",
                                                    "uptime_seconds", "idle_seconds",
                                                    "inflight", "sleeping")}})
    return gpus


def _models(gw: Gateway, records: list[RuntimeRecord], failed: dict[str, int],
            pending: dict[str, int], demand: dict[str, float], now: float) -> list[dict]:
    registry = gw.services.registry
    models = []
    for spec in gw.services.catalog:
        own = [r for r in records if r.model == spec.id]
        failures = failed.get(spec.id, 0)
        last_failure = registry.last_failure(spec.id) if failures else None
        if last_failure is not None:
            last_failure = {**last_failure, "last_logs": _tail(last_failure.get("last_logs"))}
        wanted_at = demand.get(spec.id)
        models.append({
            "id": spec.id, "engine": spec.engine, "gpus": spec.gpus,
            "instances": {state: sum(1 for r in own if r.state == state)
                          for state in sorted({r.state for r in own})},
            "ready": sum(1 for r in own if r.state == READY),
            "failed_starts": failures,
            "failed": failures >= MAX_FAILED_STARTS,
            "last_failure": last_failure,
            "waiting_since": None if wanted_at is None else round(now - wanted_at, 1),
            "batch_pending": pending.get(spec.id, 0),
        })
    return models


def _queues(gw: Gateway, pending: dict[str, int]) -> dict:
    lengths = gw.broker.queue_lengths()
    return {
        "batch_pending": pending,
        "batch_by_priority": {str(api_priority(step)): n
                              for step, n in sorted(lengths[BATCH_QUEUE].items(), reverse=True)},
        "messages": {queue: sum(by_step.values()) for queue, by_step in lengths.items()},
        # Delivered to a worker but not acknowledged: running, or held back with a countdown.
        "unacked": gw.broker.unacked(),
    }


def _job(job: dict) -> dict:
    total = job.get("total") or 0
    done = (job.get("completed") or 0) + (job.get("failed") or 0)
    return {
        "id": job["id"], "kind": job["kind"], "status": job.get("status"),
        "owner": job.get("owner"), "project": job.get("project"),
        "priority": job.get("priority") or 0,
        "model": job.get("model"), "endpoint": job.get("endpoint"),
        "created_at": job.get("created_at"),
        "total": total, "completed": job.get("completed") or 0, "failed": job.get("failed") or 0,
        "progress": round(done / total, 4) if total else 0.0,
    }


def _eval_run(jobs, job: dict) -> dict:
    """An eval run's row: its progress as a job, and its items passed and failed so far."""
    tally = jobs.tally(job["id"])
    return {**_job(job), "eval_id": job.get("eval_id"), "name": job.get("name"),
            "passed": tally.get("passed", 0), "not_passed": tally.get("failed", 0)}


def _jobs(jobs) -> dict:
    batches, _ = jobs.list("batch", None, None, JOBS_SHOWN)
    completions, _ = jobs.list("completion", None, None, JOBS_SHOWN)
    runs, _ = jobs.list("eval_run", None, None, JOBS_SHOWN)
    return {
        "open": jobs.open_count(),
        "batches": [_job(j) for j in batches],
        "completions": [_job(j) for j in completions],
        "eval_runs": [_eval_run(jobs, j) for j in runs],
    }


def _downloads(gw: Gateway, now: float | None = None) -> list[dict]:
    """Downloads and page-cache primings under way, or finished within the last hour.

    Read through runtimes.weights.ModelWeights' `downloads` and `pages` (their state is in Redis,
    one entry per repo and revision).
    """
    weights = gw.services.weights
    now = time.time() if now is None else now
    items: list[dict] = []
    seen: set[tuple[str, str | None]] = set()
    for spec in gw.services.catalog:
        if (spec.repo_id, spec.revision) in seen:  # models sharing weights share their state
            continue
        seen.add((spec.repo_id, spec.revision))
        download = weights.downloads.download_state(spec)
        if download and _recent(download, now):
            items.append({
                "kind": "download", "model": download.get("model") or spec.id,
                "repo_id": spec.repo_id, "state": download.get("status"),
                "done_bytes": download.get("bytes_done"),
                "total_bytes": download.get("bytes_total"),
                "eta_seconds": download.get("eta_seconds"),
                "rate_bytes_per_second": download.get("rate_bytes_per_second"),
                "error": download.get("error"), "finished_at": download.get("finished_at"),
            })
        primed = weights.pages.prime_state(spec)
        if primed and _recent(primed, now):
            after = primed.get("after") or {}
            items.append({
                "kind": "prime", "model": primed.get("model") or spec.id,
                "repo_id": spec.repo_id, "state": primed.get("status"),
                # Priming reports its figures when it ends: until then its bar has no value.
                "done_bytes": after.get("resident_bytes"),
                "total_bytes": after.get("weight_bytes"),
                "eta_seconds": None, "rate_bytes_per_second": None,
                "error": primed.get("error"), "finished_at": primed.get("finished_at"),
            })
    return items


def _recent(state: dict, now: float) -> bool:
    finished = state.get("finished_at")
    return finished is None or now - float(finished) < RECENT_DOWNLOAD_SECONDS


def download_metrics(gw: Gateway):
    """Prometheus families of the downloads (for webapp.metrics' collector)."""
    states = GaugeMetricFamily("gateway_downloads", "Downloads and primings by kind and state.",
                               labels=["kind", "state"])
    done = GaugeMetricFamily("gateway_download_bytes_done",
                             "Bytes downloaded or primed so far, per model.",
                             labels=["model", "kind"])
    total = GaugeMetricFamily("gateway_download_bytes_total_expected",
                              "Bytes a download or priming will have, per model.",
                              labels=["model", "kind"])
    counts: dict[tuple[str, str], int] = {}
    for item in _downloads(gw):
        kind, state = item["kind"], item["state"] or ""
        counts[(kind, state)] = counts.get((kind, state), 0) + 1
        done.add_metric([item["model"], kind], item["done_bytes"] or 0)
        total.add_metric([item["model"], kind], item["total_bytes"] or 0)
    for labels, count in sorted(counts.items()):
        states.add_metric(list(labels), count)
    return [states, done, total]


def _live_web_workers(registry, now: float) -> int:
    return sum(1 for at in registry.web_workers().values() if now - at < 10.0)
