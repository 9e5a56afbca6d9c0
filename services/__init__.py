"""Every service of the orchestrator, built once from the settings with all its hooks.

`build_services(settings, queue)` is called by each entry point: the WSGI entry (then
`webapp.create_app(services)`), the Celery entry (`tasks.worker`: workers, beat and Flower build
no web app and need no keys file) and the benchmarks. What a service must ask of the task queue
(send a chunk, a batch's validation, a start, a download) is the `TaskQueue` it is handed, so
nothing here imports Celery or Flask: `tasks.queue.CeleryQueue` is the production one, tests may
hand a list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from config.settings import Settings
from jobs.budget_windows import charge_daily
from jobs.dispatch import Dispatcher
from jobs.eval_kind import EvalRunKind
from jobs.eval_store import EvalStore
from jobs.evals import EvalService
from jobs.files import FileStore
from jobs.kinds import BatchFileKind, CompletionKind, JobKind
from jobs.lifecycle import JobLifecycle, JobQueue
from jobs.limits import BatchLimits
from jobs.migrations import adopt_unprojected
from jobs.store import JobStore
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.engine_requests import check_engine_body
from runtimes.factory import build_control_plane
from runtimes.redis_client import make_redis
from runtimes.registry import RuntimeRegistry
from runtimes.routing import RuntimeRouter
from runtimes.starts import start_requester
from runtimes.weights import ModelWeights
from services import metrics
from services.timeseries import SeriesRecorder
from services.usage_ledger import UsageLedger, line_counts


class TaskQueue(JobQueue, Protocol):
    """The work services send to the Celery workers (besides the jobs' `JobQueue`)."""

    def send_start(self, model: str, replicas: int = 1) -> None:
        """Start `model` (callers go through `Services.request_start`, which deduplicates)."""
        ...

    def request_download(self, model: str, for_start: bool = False) -> None: ...

    def send_prime(self, model: str) -> None: ...


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: redis.Redis
    catalog: ModelCatalog
    registry: RuntimeRegistry
    control: ControlPlane
    weights: ModelWeights
    router: RuntimeRouter
    files: FileStore
    jobs: JobStore
    lifecycle: JobLifecycle
    dispatch: Dispatcher
    eval_store: EvalStore
    evals: EvalService
    series: SeriesRecorder
    usage: UsageLedger
    queue: TaskQueue
    # Asks for a start of a model, once until that start is done (runtimes.starts).
    request_start: Callable[..., None]


def _count_line_usage(ledger: UsageLedger):
    """The dispatcher's `on_usage`: lines stored for the first time, counted once."""

    def count(owner: dict, results) -> None:
        counts = line_counts(owner, results)
        ledger.add(counts, time.time())
        metrics.tokens_counted(counts)
        # The owner's daily budgets count batch work too (jobs.budget_windows).
        charge_daily(ledger.redis, owner.get("budgets") or [],
                     sum(f[1] + f[2] for f in counts.values()),
                     sum(f[0] for f in counts.values()))

    return count


def batch_limits(settings: Settings) -> BatchLimits:
    return BatchLimits(
        max_lines=settings.batch_max_lines,
        max_file_bytes=settings.batch_max_file_bytes,
        chunk_lines=settings.batch_chunk_lines,
        chunk_parallel=settings.batch_chunk_parallel,
        line_attempts=settings.batch_line_attempts,
        per_runtime_cap=settings.batch_max_inflight_per_runtime,
        stall_seconds=settings.batch_stall_seconds,
    )


def build_services(settings: Settings, queue: TaskQueue,
                   client: redis.Redis | None = None) -> Services:
    client = client or make_redis(settings)
    jobs = JobStore(client)
    series = SeriesRecorder(client)
    usage = UsageLedger(client)
    registry = RuntimeRegistry(client)
    # The tick asks for starts the same deduplicated way a cold call does.
    request_start = start_requester(registry, queue.send_start)
    control = build_control_plane(
        settings, client, request_start, registry=registry,
        request_download=queue.request_download,
        batch_pending=jobs.pending,  # the autoscaler's batch queue depth
        on_started=metrics.engine_started(series),
    )
    router = RuntimeRouter(control.registry, settings.registry_cache_seconds, control.catalog)
    files = FileStore(client, settings.files_dir)
    limits = batch_limits(settings)
    # Eval runs are batch work of their own kind: the same chunks, leases, retries and sweep.
    items_dir = settings.files_dir / "evals"
    kinds: dict[str, JobKind] = {kind.name: kind for kind in (
        BatchFileKind(jobs, files), CompletionKind(jobs), EvalRunKind(jobs, items_dir))}
    lifecycle = JobLifecycle(jobs, files, control.catalog, limits, kinds, queue,
                             check_engine_body)
    dispatch = Dispatcher(jobs, control.catalog, router, limits, kinds, lifecycle.close_chunk,
                          settings.upstream_connect_timeout, settings.upstream_read_timeout,
                          on_line=metrics.batch_line_finished,
                          on_usage=_count_line_usage(usage))
    eval_store = EvalStore(client)
    evals = EvalService(eval_store, jobs, files, items_dir, limits, queue)
    adopt_unprojected(jobs, eval_store)
    return Services(
        settings=settings, redis=client, catalog=control.catalog, registry=control.registry,
        control=control, weights=control.weights, router=router, files=files, jobs=jobs,
        lifecycle=lifecycle, dispatch=dispatch, eval_store=eval_store, evals=evals,
        series=series, usage=usage, queue=queue, request_start=request_start,
    )
