"""The Celery app: configured from `celeryconfig` and the settings, holding the services.

Tasks find what they work with as `self.app.services` (bind=True): the services built once by
the process's entry (`tasks.worker` for workers, beat and Flower; the WSGI entry, which only
sends tasks, makes one without services).
"""

from __future__ import annotations

from celery import Celery

from config.settings import Settings
from services import Services
from tasks.periodic_logs import quiet_periodic_task_lines
from tasks.sentinel_transport import use_safe_sentinel_transport

# Seconds a broker or result-backend command waits on a silent Redis (under Sentinel): above
# kombu's 1 s BRPOP poll, well under TCP's own give-up.
BROKER_SOCKET_TIMEOUT = 10.0


class GatewayCelery(Celery):
    def __init__(self, settings: Settings, services: Services | None = None):
        super().__init__("llm-gateway")
        self.services = services
        self.config_from_object("celeryconfig")
        broker_options = {**self.conf.broker_transport_options,
                          "visibility_timeout": settings.celery_visibility_timeout}
        url, backend_options = settings.redis_url, {}
        if settings.redis_sentinel is not None:
            # kombu's and Celery's sentinel transports: they ask the Sentinels for the master
            # named here, and again after a connection to it fails.
            url = settings.redis_sentinel.celery_url()
            use_safe_sentinel_transport()
            # A master lost with its machine (a container SIGKILLed, a host gone) sends no
            # reset: without a socket timeout, a publisher blocked on its reply (beat) would
            # wait for TCP to give up, many minutes; with one it asks the Sentinels again.
            sentinel_options = {"master_name": settings.redis_sentinel_master,
                                "sentinel_kwargs": {"socket_timeout": 1.0},
                                "socket_timeout": BROKER_SOCKET_TIMEOUT,
                                "socket_connect_timeout": BROKER_SOCKET_TIMEOUT,
                                "socket_keepalive": True}
            broker_options.update(sentinel_options)
            backend_options = dict(sentinel_options)
        self.conf.update(
            broker_url=url,
            result_backend=url,
            broker_transport_options=broker_options,
            result_backend_transport_options=backend_options,
        )
        schedule = self.conf.beat_schedule
        schedule["batch-sweep"]["schedule"] = settings.batch_sweep_seconds
        schedule["autoscale-tick"]["schedule"] = settings.autoscale_interval_seconds
        schedule["autoscale-tick"]["options"]["expires"] = max(
            1.0, settings.autoscale_interval_seconds)
        quiet_periodic_task_lines(schedule)


def make_celery(settings: Settings, services: Services | None = None) -> GatewayCelery:
    """The process's Celery app, made the default one (the tasks' `apply_async` sends with
    it)."""
    app = GatewayCelery(settings, services)
    app.set_default()
    return app
