"""Celery side of the orchestrator: the Celery app bound to the Flask app, and thin tasks.

Tasks take ids, load state and call into `runtimes/` (or the job stores); they are idempotent,
so a redelivered message does no harm. The worker's entry point is `tasks.worker`.
"""
