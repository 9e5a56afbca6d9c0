"""BatchService's own bookkeeping in a long-lived worker, against a real Redis."""

from __future__ import annotations

import time

from runtimes.catalog import ModelCatalog
from runtimes.registry import RuntimeRegistry
from runtimes.routing import RuntimeRouter
from tasks import batch_service
from tasks.batch_service import BatchLimits, BatchService
from tasks.filestore import FileStore
from tasks.jobstore import JobStore


def test_the_job_status_cache_stays_bounded(redis_db, tmp_path, monkeypatch):
    """One entry per job a worker has run would grow without end over many single
    completions; entries not looked at lately are forgotten."""
    monkeypatch.setattr(batch_service, "STATUS_CACHE_SIZE", 50)
    monkeypatch.setattr(batch_service, "STATE_CACHE_SECONDS", 0.001)
    jobs = JobStore(redis_db, "t")
    service = BatchService(jobs, FileStore(redis_db, tmp_path, "t"), ModelCatalog([]),
                           RuntimeRouter(RuntimeRegistry(redis_db, "t")), BatchLimits(),
                           enqueue_chunk=lambda *args: None, validate_line=lambda *args: None)
    running = jobs.create("batch", "o", {"status": "in_progress"})
    finished = jobs.create("batch", "o", {"status": "completed"})
    assert service._still_running(running) and not service._still_running(finished)
    for _ in range(500):
        service._still_running(jobs.create("completion", "o", {"status": "queued"}))
        time.sleep(0.002)
    assert len(service._status) <= 50 + 1
    assert service._still_running(running) and not service._still_running(finished)
