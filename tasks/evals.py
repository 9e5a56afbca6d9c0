"""Eval tasks (queue `batch`): prepare a run. Its lines then run as ordinary batch chunks
(`batch.run_chunk`), so evals share the batch queue's priorities, admission and recovery.

Thin: takes a run id and calls `jobs.evals.EvalService.prepare`, which is safe to run twice.
"""

from __future__ import annotations

import redis
from celery import shared_task


@shared_task(name="evals.prepare_run", bind=True, ignore_result=True,
             autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
             retry_backoff=True, retry_backoff_max=30, max_retries=20)
def prepare_run(self, run_id: str) -> None:
    self.app.services.evals.prepare(run_id)
