"""Batch tasks (queue `batch`): validate a batch, run a chunk of its lines, sweep expiries.

Thin: each takes ids and calls the job domain (`jobs.lifecycle`, `jobs.dispatch`). A chunk whose
lines must wait (no ready engine, transient engine errors) re-sends itself with a countdown
instead of holding a worker.
"""

from __future__ import annotations

import redis
from celery import shared_task


@shared_task(name="batch.validate", bind=True, ignore_result=True)
def validate(self, batch_id: str) -> None:
    self.app.services.lifecycle.validate(batch_id)


# Redis gone for a moment (a restart, a failover): try the chunk again rather than fail it, which
# would acknowledge and drop its message. If even the retry cannot be sent, the sweep sends the
# chunk again once the job is seen stalled.
@shared_task(name="batch.run_chunk", bind=True, ignore_result=True,
             autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
             retry_backoff=True, retry_backoff_max=30, max_retries=20)
def run_chunk(self, job_id: str, first: int, end: int, offset: int, priority: int) -> None:
    services = self.app.services
    countdown = services.dispatch.run_chunk(job_id, first, end, offset)
    if countdown is not None:
        services.queue.send_chunk(job_id, first, end, offset, priority, countdown)


@shared_task(name="batch.sweep", bind=True, ignore_result=True)
def sweep(self) -> None:
    self.app.services.lifecycle.sweep()
