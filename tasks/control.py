"""Control tasks (queue `control`): start a model's engine, and the autoscaler's periodic tick."""

from __future__ import annotations

from celery import shared_task
from flask import current_app


@shared_task(name="control.ensure_running", ignore_result=True)
def ensure_running(model: str) -> None:
    current_app.extensions["control"].ensure_running(model)


@shared_task(name="autoscale.tick", ignore_result=True)
def tick() -> None:
    current_app.extensions["control"].tick()


def start_requester(redis_client, prefix: str, dedupe_seconds: float = 10.0):
    """A function that asks for a start of a model at most once per `dedupe_seconds`.

    However many callers in however many web workers ask at once, one message is sent (`SET NX`);
    the control task itself also refuses to start a second instance.
    """

    def request_start(model: str) -> None:
        if redis_client.set(f"{prefix}:ensure:{model}", "1", nx=True, ex=int(dedupe_seconds)):
            ensure_running.apply_async(args=[model], queue="control")

    return request_start
