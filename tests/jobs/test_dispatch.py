"""The dispatcher's own bookkeeping in a long-lived worker, against a real Redis."""

from __future__ import annotations

import time

from jobs import dispatch
from jobs.dispatch import Dispatcher
from jobs.files import FileStore
from jobs.kinds import BatchFileKind
from jobs.limits import BatchLimits
from jobs.store import JobStore
from runtimes.catalog import ModelCatalog
from runtimes.registry import RuntimeRegistry
from runtimes.routing import RuntimeRouter


def test_the_job_status_cache_stays_bounded(redis_db, tmp_path, monkeypatch):
    """One entry per job a worker has run would grow without end over many single
    completions; entries not looked at lately are forgotten."""
    monkeypatch.setattr(dispatch, "STATUS_CACHE_SIZE", 50)
    monkeypatch.setattr(dispatch, "STATE_CACHE_SECONDS", 0.001)
    jobs = JobStore(redis_db, "t")
    files = FileStore(redis_db, tmp_path, "t")
    service = Dispatcher(jobs, ModelCatalog([]), RuntimeRouter(RuntimeRegistry(redis_db, "t")),
                         BatchLimits(), {"batch": BatchFileKind(jobs, files)},
                         close_chunk=lambda job, first: None)
    running = jobs.create("batch", "o", {"status": "in_progress"})
    finished = jobs.create("batch", "o", {"status": "completed"})
    assert service.still_running(running) and not service.still_running(finished)
    for _ in range(500):
        service.still_running(jobs.create("completion", "o", {"status": "queued"}))
        time.sleep(0.002)
    assert len(service._status) <= 50 + 1
    assert service.still_running(running) and not service.still_running(finished)
