"""Control tasks (queue `control`): start a model's engine, and the autoscaler's periodic tick."""

from __future__ import annotations

from celery import shared_task
from flask import current_app


@shared_task(name="control.ensure_running", ignore_result=True)
def ensure_running(model: str, replicas: int = 1) -> None:
    control = current_app.extensions["control"]
    try:
        control.ensure_running(model, replicas)
    finally:
        control.registry.release_start_request(model)


@shared_task(name="autoscale.tick", ignore_result=True)
def tick() -> None:
    current_app.extensions["control"].tick()


def start_requester(registry, dedupe_seconds: float = 30.0):
    """A function that asks for a start of a model, once until that start is done.

    However many callers in however many web workers ask at once, one message is sent (`SET NX`
    in the registry, released when the task ends or after `dedupe_seconds`); the control task
    itself also refuses to start a second instance.
    """

    def request_start(model: str, replicas: int = 1) -> None:
        if registry.claim_start_request(model, dedupe_seconds):
            ensure_running.apply_async(args=[model, replicas], queue="control")

    return request_start
