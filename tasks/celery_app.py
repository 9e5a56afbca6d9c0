"""The Celery app, made from the Flask app so every task runs inside its app context."""

from __future__ import annotations

from celery import Celery, Task
from flask import Flask


def celery_init_app(app: Flask) -> Celery:
    settings = app.extensions["settings"]

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object("celeryconfig")
    celery_app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        broker_transport_options={
            **celery_app.conf.broker_transport_options,
            "visibility_timeout": settings.celery_visibility_timeout,
        },
    )
    celery_app.conf.beat_schedule["batch-sweep"]["schedule"] = settings.batch_sweep_seconds
    celery_app.conf.beat_schedule["autoscale-tick"]["schedule"] = (
        settings.autoscale_interval_seconds
    )
    celery_app.conf.beat_schedule["autoscale-tick"]["options"]["expires"] = max(
        1.0, settings.autoscale_interval_seconds
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
