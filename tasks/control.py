"""Control tasks (queue `control`): start a model's engine, and the autoscaler's periodic tick.

Thin: each calls `runtimes.control.ControlPlane`. A start is asked for once until it is done
(`runtimes.starts.start_requester`); the task releases that claim when it ends.
"""

from __future__ import annotations

from celery import shared_task


@shared_task(name="control.ensure_running", bind=True, ignore_result=True)
def ensure_running(self, model: str, replicas: int = 1) -> None:
    control = self.app.services.control
    try:
        control.ensure_running(model, replicas)
    finally:
        control.registry.release_start_request(model)


@shared_task(name="autoscale.tick", bind=True, ignore_result=True)
def tick(self) -> None:
    self.app.services.control.tick()
