"""Changes to data stored by an older release, made once when a process starts."""

from __future__ import annotations

import logging

import redis

from jobs.eval_store import EvalStore
from jobs.store import JobStore

log = logging.getLogger(__name__)


def adopt_unprojected(jobs: JobStore, evals: EvalStore) -> None:
    """Jobs and evals stored before projects existed belong to `default` (files need nothing:
    one without a project reads as `default`). Idempotent, so every process may run it; the
    mark is set only once it is done."""
    try:
        if jobs.migrated("projects"):
            return
        adopted = jobs.adopt_unprojected() + evals.adopt_unprojected()
        jobs.mark_migrated("projects")
    except redis.RedisError as exc:  # Redis down at start: the process still comes up
        log.warning("stored jobs not given to projects yet (Redis: %s); next start will", exc)
        return
    if adopted:
        log.info("gave %d jobs and evals to project 'default'", adopted)
