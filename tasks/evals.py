"""Eval tasks (queue `batch`): prepare a run. Its lines then run as ordinary batch chunks
(`batch.run_chunk`), so evals share the batch queue's priorities, admission and recovery.

Thin: takes a run id and calls `EvalService.prepare`, which is safe to run twice.
"""

from __future__ import annotations

import redis
from celery import shared_task
from flask import current_app


def enqueue_prepare(run_id: str, priority: int) -> None:
    # Preparing is quick and only sends chunks, which carry the run's own priority: it goes
    # ahead of waiting lines (as a batch's validation does).
    prepare_run.apply_async(args=[run_id], queue="batch", priority=0)


@shared_task(name="evals.prepare_run", ignore_result=True,
             autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
             retry_backoff=True, retry_backoff_max=30, max_retries=20)
def prepare_run(run_id: str) -> None:
    current_app.extensions["evals"].prepare(run_id)
