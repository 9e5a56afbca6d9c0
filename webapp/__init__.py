"""The Flask application factory of the orchestrator.

`create_app(settings)` wires the app: settings, keys, the model catalog, Redis, the runtime
registry and control plane, the engine client, the Celery app, error handling and one blueprint
per feature. Only the WSGI entry (`webapp.wsgi`) and the Celery entry (`tasks.worker`) call it.
"""

from __future__ import annotations

import logging
import signal
import threading

import redis
from flask import Flask

from config.settings import Settings, load_settings
from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.registry import RuntimeRegistry
from tasks.celery_app import celery_init_app
from tasks.control import start_requester
from webapp.errors import register_error_handlers
from webapp.keystore import KeyStore
from webapp.limits import KeyLimiter
from webapp.logs import configure_logging
from webapp.relay import EngineClient
from webapp.routing import RuntimeRouter
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
    register_blueprints(app)
    register_reload_signal(app)
    return app


def make_backend(settings: Settings):
    if settings.runtime_backend == "process":
        env = {"HF_HOME": str(settings.hf_home)}
        if settings.hf_token:
            env["HF_TOKEN"] = settings.hf_token
        return ProcessBackend(settings.runtime_state_dir, host=settings.runtime_host, base_env=env)
    from runtimes.backends.docker import DockerBackend

    return DockerBackend.from_settings(settings)


def register_services(app: Flask, settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    registry = RuntimeRegistry(client)
    catalog = ModelCatalog.from_file(settings.model_catalog_file, settings.runtime_type)
    request_start = start_requester(client, registry.prefix)
    app.extensions.update(
        redis=client,
        keystore=KeyStore(settings.auth_keys_file, settings.keys_reload_interval_seconds),
        limiter=KeyLimiter(client),
        catalog=catalog,
        registry=registry,
        router=RuntimeRouter(registry, settings.registry_cache_seconds),
        usage=UsageTracker(registry),
        engine_client=EngineClient(
            settings.upstream_pool_size,
            settings.upstream_connect_timeout,
            settings.upstream_read_timeout,
        ),
        request_start=request_start,
        control=ControlPlane(
            catalog,
            registry,
            make_backend(settings),
            default_idle_timeout=settings.idle_timeout_seconds,
            start_timeout=settings.start_timeout_seconds,
            drain_timeout=settings.upstream_read_timeout,
            request_start=request_start,
        ),
    )


def register_blueprints(app: Flask) -> None:
    from webapp import health, realtime

    app.register_blueprint(health.bp)
    app.register_blueprint(realtime.bp)


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
