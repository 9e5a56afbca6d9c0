"""The services' `TaskQueue` on Celery: each effect is one task message.

Which queue and priority each message gets is decided here (tasks.broker maps the API's
priorities onto the Redis transport's).
"""

from __future__ import annotations

from tasks import batch, control, downloads, evals
from tasks.broker import celery_priority


class CeleryQueue:
    def send_chunk(self, job_id: str, first: int, end: int, offset: int, priority: int,
                   countdown: float = 0) -> None:
        batch.run_chunk.apply_async(args=[job_id, first, end, offset, priority], queue="batch",
                                    priority=celery_priority(priority),
                                    countdown=countdown or None)

    def send_preparation(self, kind: str, job_id: str) -> None:
        # Preparing is quick and only sends chunks, which carry the job's own priority: it goes
        # ahead of waiting lines.
        task = evals.prepare_run if kind == "eval_run" else batch.validate
        task.apply_async(args=[job_id], queue="batch", priority=0)

    def send_start(self, model: str, replicas: int = 1) -> None:
        control.ensure_running.apply_async(args=[model, replicas], queue="control")

    def request_download(self, model: str, for_start: bool = False) -> None:
        downloads.download_model_async.apply_async(args=[model, for_start], queue="downloads")

    def send_prime(self, model: str) -> None:
        downloads.prime_model.apply_async(args=[model], queue="downloads")
