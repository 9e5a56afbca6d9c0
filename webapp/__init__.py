"""The Flask application factory of the orchestrator.

`create_app(settings)` wires the app: settings, keys, the model catalog, Redis, the runtime
registry and control plane, the engine client, the Celery app, error handling and one blueprint
per feature. Only the WSGI entry (`webapp.wsgi`) and the Celery entry (`tasks.worker`) call it.
"""

from __future__ import annotations

import logging
import signal
import threading

from flask import Flask

from config.settings import Settings, load_settings
from runtimes.factory import build_control_plane, make_redis
from runtimes.routing import RuntimeRouter
from runtimes.upstream import EngineClient
from tasks.batch import enqueue_chunk, enqueue_validate
from tasks.batch_service import BatchLimits, BatchService
from tasks.celery_app import celery_init_app
from tasks.control import start_requester
from tasks.downloads import download_requester
from tasks.eval_runner import EvalRunner
from tasks.eval_service import EvalService
from tasks.eval_store import EvalStore
from tasks.evals import enqueue_prepare
from tasks.filestore import FileStore
from tasks.jobstore import JobStore
from webapp.errors import register_error_handlers
from webapp.keystore import KeyStore
from webapp.limits import KeyLimiter
from webapp.logs import configure_logging
from webapp.metrics import register_metrics
from webapp.request_id import register_request_id
from webapp.schemas import check_engine_body
from webapp.usage import UsageTracker


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_json)
    app = Flask(__name__, template_folder="../templates")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["settings"] = settings
    register_services(app, settings)
    celery_init_app(app)
    register_error_handlers(app)
    register_request_id(app)
    register_metrics(app)
    register_blueprints(app)
    register_reload_signal(app)
    return app


def register_services(app: Flask, settings: Settings) -> None:
    client = make_redis(settings)
    control = build_control_plane(settings, client)
    registry = control.registry
    # The tick asks for starts the same deduplicated way a cold call does.
    control.request_start = request_start = start_requester(registry)
    control.weights.request_download = download_requester()
    router = RuntimeRouter(registry, settings.registry_cache_seconds)
    register_batch_services(app, settings, client, control, router)
    app.extensions.update(
        redis=client,
        keystore=KeyStore(settings.auth_keys_file, settings.keys_reload_interval_seconds),
        limiter=KeyLimiter(client),
        catalog=control.catalog,
        registry=registry,
        router=router,
        usage=UsageTracker(registry),
        engine_client=EngineClient(
            settings.upstream_pool_size,
            settings.upstream_connect_timeout,
            settings.upstream_read_timeout,
        ),
        request_start=request_start,
        control=control,
        weights=control.weights,
    )


def register_batch_services(app: Flask, settings: Settings, client, control, router) -> None:
    """Files, batch jobs and eval runs: one job store, one batch machinery."""
    files = FileStore(client, settings.files_dir)
    jobs = JobStore(client)
    control.batch_pending = jobs.pending  # the autoscaler's batch queue depth
    batches = BatchService(
        jobs, files, control.catalog, router,
        BatchLimits(
            max_lines=settings.batch_max_lines,
            max_file_bytes=settings.batch_max_file_bytes,
            chunk_lines=settings.batch_chunk_lines,
            chunk_parallel=settings.batch_chunk_parallel,
            line_attempts=settings.batch_line_attempts,
            per_runtime_cap=settings.batch_max_inflight_per_runtime,
            stall_seconds=settings.batch_stall_seconds,
        ),
        enqueue_chunk=enqueue_chunk,
        validate_line=check_engine_body,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
    )
    # Eval runs are batch work of their own kind: the same chunks, leases, retries and sweep.
    items_dir = settings.files_dir / "evals"
    batches.kinds["eval_run"] = EvalRunner(jobs, items_dir, batches.request)
    eval_store = EvalStore(client)
    evals = EvalService(eval_store, jobs, files, items_dir, batches.limits,
                        enqueue_prepare, enqueue_chunk)
    adopt_unprojected(client, jobs, eval_store)
    batches.preparers.update(batch=enqueue_validate,
                             eval_run=lambda run_id: enqueue_prepare(run_id, 0))
    app.extensions.update(files=files, jobs=jobs, batches=batches, evals=evals)


def adopt_unprojected(client, jobs: JobStore, evals: EvalStore) -> None:
    """Jobs and evals stored before projects existed belong to `default` (files need nothing:
    one without a project reads as `default`). Idempotent, so every process may run it; the
    mark is set only once it is done."""
    mark = f"{jobs.prefix}:migrated:projects"
    if client.exists(mark):
        return
    adopted = jobs.adopt_unprojected() + evals.adopt_unprojected()
    client.set(mark, "1")
    if adopted:
        logging.getLogger(__name__).info("gave %d jobs and evals to project 'default'", adopted)


def register_blueprints(app: Flask) -> None:
    # Imported here, not at the top: the views import this package's extensions at call time.
    from webapp import batch, batches, dashboard, docs, evals, files, health, models, realtime

    for module in (health, docs, realtime, batch, files, batches, evals, dashboard, models):
        app.register_blueprint(module.bp)


def register_reload_signal(app: Flask) -> None:
    """SIGHUP re-reads the keys file (in addition to the file-change check)."""
    if threading.current_thread() is not threading.main_thread():
        return
    keystore = app.extensions["keystore"]
    previous = signal.getsignal(signal.SIGHUP)

    def on_hup(signum, frame):
        keystore.request_reload()
        logging.getLogger(__name__).info("SIGHUP: keys will be re-read")
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_hup)
