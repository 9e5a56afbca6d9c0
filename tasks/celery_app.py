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


class GatewayCelery(Celery):
    def __init__(self, settings: Settings, services: Services | None = None):
        super().__init__("llm-gateway")
        self.services = services
        self.config_from_object("celeryconfig")
        self.conf.update(
            broker_url=settings.redis_url,
            result_backend=settings.redis_url,
            broker_transport_options={
                **self.conf.broker_transport_options,
                "visibility_timeout": settings.celery_visibility_timeout,
            },
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
