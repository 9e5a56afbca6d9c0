"""Batch tasks (queue `batch`): validate a batch, run a chunk of its lines, sweep expiries.

Thin: each takes ids and calls `BatchService`. A chunk whose lines must wait (no ready engine,
transient engine errors) re-sends itself with a countdown instead of holding a worker.
Priorities: the API's 0-9, larger sooner, become the Redis transport's 9-0 (smaller sooner).
"""

from __future__ import annotations

import redis
from celery import shared_task
from flask import current_app


def celery_priority(priority: int) -> int:
    return 9 - max(0, min(9, priority))


def enqueue_chunk(job_id: str, first: int, end: int, offset: int, priority: int,
                  countdown: float = 0) -> None:
    run_chunk.apply_async(args=[job_id, first, end, offset, priority], queue="batch",
                          priority=celery_priority(priority), countdown=countdown or None)


def enqueue_validate(batch_id: str) -> None:
    # Validation is quick and only sends chunks, which carry the batch's own priority: it goes
    # ahead of waiting lines.
    validate.apply_async(args=[batch_id], queue="batch", priority=0)


@shared_task(name="batch.validate", ignore_result=True)
def validate(batch_id: str) -> None:
    current_app.extensions["batches"].validate(batch_id)


# Redis gone for a moment (a restart, a failover): try the chunk again rather than fail it, which
# would acknowledge and drop its message. If even the retry cannot be sent, the sweep sends the
# chunk again once the job is seen stalled.
@shared_task(name="batch.run_chunk", ignore_result=True,
             autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
             retry_backoff=True, retry_backoff_max=30, max_retries=20)
def run_chunk(job_id: str, first: int, end: int, offset: int, priority: int) -> None:
    countdown = current_app.extensions["batches"].run_chunk(job_id, first, end, offset)
    if countdown is not None:
        enqueue_chunk(job_id, first, end, offset, priority, countdown)


@shared_task(name="batch.sweep", ignore_result=True)
def sweep() -> None:
    current_app.extensions["batches"].sweep()
