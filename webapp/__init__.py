"""The Flask application factory of the orchestrator.

`create_app(services)` wires the web app around services built once (`services.build_services`):
what only the web needs (the keys, per-key limits, the usage reporter, the engine client, the
broker's queue depths), error handling, request ids, metrics and one blueprint per feature.
Only the WSGI entry (`webapp.wsgi`) calls it; the Celery workers build no web app.
"""

from __future__ import annotations

import logging
import signal
import threading

from flask import Flask

from config.logs import configure_logging
from runtimes.lora import AdapterLoader
from runtimes.upstream import EngineClient
from services import Services
from tasks.broker import BrokerStats
from webapp import overview
from webapp.budgets import BudgetGate
from webapp.context import EXTENSION, Gateway
from webapp.errors import register_error_handlers
from webapp.keystore import KeyStore
from webapp.limits import KeyLimiter
from webapp.metrics import register_metrics
from webapp.request_id import current_request_id, register_request_id
from webapp.response_owners import ResponseOwners
from webapp.usage import UsageTracker


def create_app(services: Services, broker_options: dict | None = None) -> Flask:
    """The web app; `broker_options` are the Celery broker's transport options (where its
    queues are in Redis, for the dashboard's queue depths)."""
    settings = services.settings
    configure_logging(settings.log_level, settings.log_json, current_request_id)
    app = Flask(__name__, template_folder="../templates")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions[EXTENSION] = build_gateway(services, broker_options or {})
    register_error_handlers(app)
    register_request_id(app)
    register_metrics(app)
    register_blueprints(app)
    register_reload_signal(app)
    return app


def build_gateway(services: Services, broker_options: dict) -> Gateway:
    settings = services.settings
    broker = BrokerStats(services.redis, broker_options)
    return Gateway(
        services=services,
        keystore=KeyStore(settings.auth_keys_file, settings.keys_reload_interval_seconds),
        limiter=KeyLimiter(services.redis),
        # The usage reporter also samples the queue depths for the dashboard's charts.
        usage=UsageTracker(services.registry, services.series,
                           sample_queues=lambda: overview.queue_sample(services.jobs, broker),
                           ledger=services.usage),
        engine_client=EngineClient(
            settings.upstream_pool_size,
            settings.upstream_connect_timeout,
            settings.upstream_read_timeout,
        ),
        broker=broker,
        adapters=AdapterLoader(services.registry),
        budgets=BudgetGate(services.redis),
        responses=ResponseOwners(services.redis),
    )


def register_blueprints(app: Flask) -> None:
    # Imported here, not at the top: the views reach the gateway through webapp.context.
    from webapp import (
        batch,
        batches,
        dashboard,
        docs,
        engine_api,
        evals,
        files,
        health,
        messages,
        models,
        realtime,
        usage_api,
    )

    for module in (health, docs, realtime, engine_api, messages, batch, files, batches, evals,
                   dashboard, models, usage_api):
        app.register_blueprint(module.bp)


def register_reload_signal(app: Flask) -> None:
    """SIGHUP re-reads the keys file (in addition to the file-change check)."""
    if threading.current_thread() is not threading.main_thread():
        return
    keystore = app.extensions[EXTENSION].keystore
    previous = signal.getsignal(signal.SIGHUP)

    def on_hup(signum, frame):
        keystore.request_reload()
        logging.getLogger(__name__).info("SIGHUP: keys will be re-read")
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_hup)
