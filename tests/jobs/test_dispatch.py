"""The dispatcher's own bookkeeping in a long-lived worker, against a real Redis."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs import dispatch
from jobs.dispatch import Dispatcher
from jobs.files import FileStore
from jobs.kinds import BatchFileKind
from jobs.limits import BatchLimits
from jobs.store import JobStore
from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.registry import READY, RuntimeRecord, RuntimeRegistry
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


@pytest.fixture
def recording_engine():
    """A real HTTP server on loopback that answers every POST with a chat completion and keeps
    the bodies it was sent."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            answer = json.dumps({"object": "chat.completion", "choices": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("args", "job_priority", "sent"), [
    (("--scheduling-policy", "priority"), 7, 3),  # vLLM: lower first, batch 10 - p
    (("--scheduling-policy", "priority"), 0, 10),
    (("--enable-priority-scheduling",), 7, 7),  # SGLang: higher first
    ((), 7, None),  # not in priority mode: no field at all
])
def test_batch_lines_carry_the_engine_priority_of_their_job(
        redis_db, tmp_path, recording_engine, args, job_priority, sent):
    """The line's own `priority` never reaches the engine: the job's priority, in the engine's
    polarity, does; the stored line is left as the caller wrote it."""
    port, seen = recording_engine
    engine = "sglang" if "--enable-priority-scheduling" in args else "vllm"
    spec = ModelSpec("m/prio", engine, args=args)
    registry = RuntimeRegistry(redis_db, "t")
    registry.create(RuntimeRecord(id="rt-1", model=spec.id, engine=engine, backend="process",
                                  state=READY, host="127.0.0.1", port=port))
    jobs = JobStore(redis_db, "t")
    files = FileStore(redis_db, tmp_path, "t")
    service = Dispatcher(jobs, ModelCatalog([spec]), RuntimeRouter(registry), BatchLimits(),
                         {"batch": BatchFileKind(jobs, files)}, close_chunk=lambda job, n: None)
    job = {"id": jobs.create("batch", "o", {"status": "in_progress"}), "priority": job_priority}
    line = {"model": spec.id, "messages": [{"role": "user", "content": "hi"}], "priority": -5}
    answer = service.request(job, spec.id, "/v1/chat/completions", line)
    assert answer.status == 200
    assert seen[-1].get("priority") == sent and ("priority" in seen[-1]) == (sent is not None)
    assert line["priority"] == -5  # the caller's line, unchanged
