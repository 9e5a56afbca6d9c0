"""Celery side of the orchestrator: the Celery app, the task queue, and thin tasks.

Tasks take ids, find the services on their app (`self.app.services`) and call into `jobs/` or
`runtimes/`; they are idempotent, so a redelivered message does no harm. The worker's entry point
is `tasks.worker`.
"""
