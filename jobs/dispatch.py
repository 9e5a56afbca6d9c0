"""Running a chunk of a job's lines against the engines: the only code here with threads,
admission leases and HTTP.

A chunk runs its lines concurrently (at most `chunk_parallel`), each started once it holds an
admission lease of its model (the autoscaler lowers the cap when realtime traffic needs the
engine); a line that ends hands its lease on. Each finished line goes to the job's line writer,
which stores many results per Redis round trip, exactly once (`JobStore.record_lines`). A line
whose model has no ready engine is not run: the chunk asks to come back later (a countdown),
instead of holding a worker, and its waiting lines are the model's queue depth, which makes the
autoscaler start the engine. Transient engine failures (refused, reset, 5xx) leave a line to be
retried (`line_attempts`), not failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from jobs.admission import AdmissionGate
from jobs.budget_windows import over_daily
from jobs.kinds import EngineAnswer, JobKind, JobStopped, Transient, error_line, line_models
from jobs.limits import BatchLimits
from jobs.linewriter import LineWriter
from jobs.store import RUNNING_STATUSES, JobStore, LineResult
from runtimes.catalog import ModelCatalog
from runtimes.engine_errors import normalise_engine_error
from runtimes.engine_priority import BATCH, JOB_PRIORITIES, set_engine_priority
from runtimes.leases import LeaseSet
from runtimes.lora import AdapterLoader, AdapterLoadError
from runtimes.policy import batch_per_engine
from runtimes.routing import RuntimeRouter
from runtimes.upstream import EngineBrokeOff, EngineClient, EngineTimeout, EngineUnreachable

log = logging.getLogger(__name__)

# Seconds a chunk waits before looking again for its model's engine, or after a transient error.
REQUEUE_SECONDS = 3.0
# Seconds a chunk whose owner is over a daily budget waits before it looks again.
BUDGET_RECHECK_SECONDS = 30.0
# How long a worker trusts what it read of a job's status and the admission caps: every line
# checks both, and a cancel need only stop dispatch "quickly", not within a microsecond.
STATE_CACHE_SECONDS = 0.5
# Jobs whose status a worker remembers before it forgets those it has not looked at lately.
STATUS_CACHE_SIZE = 1000


class Dispatcher:
    """Runs chunks in this worker process. `close_chunk(job, first)` is told when a chunk has
    nothing left to run (the lifecycle then finalizes the job once all are closed);
    `on_line(model, ok)` once per line stored here (metrics)."""

    def __init__(self, jobs: JobStore, catalog: ModelCatalog, router: RuntimeRouter,
                 limits: BatchLimits, kinds: dict[str, JobKind],
                 close_chunk: Callable[[dict | None, int], None],
                 connect_timeout: float = 5.0, read_timeout: float = 600.0,
                 on_line: Callable[[str, bool], None] | None = None,
                 on_usage: Callable[[dict, list[LineResult]], None] | None = None):
        self.jobs = jobs
        self.catalog = catalog
        self.router = router
        self.limits = limits
        self.kinds = kinds
        self.close_chunk = close_chunk
        self.on_line = on_line
        # Told the lines stored here for the first time, with their job's owner, project and
        # kind: their usage is counted once (services.usage_ledger), however often they ran.
        self.on_usage = on_usage
        self._owners: dict[str, dict] = {}
        # A line for a LoRA adapter runs on an engine of its base, which loads it on first use.
        self.adapters = AdapterLoader(router.registry, timeout=read_timeout)
        self.admission = AdmissionGate(
            LeaseSet(jobs.redis, f"{jobs.prefix}:batch_inflight", lease_seconds=read_timeout + 60),
            self._cap, sync_seconds=STATE_CACHE_SECONDS)
        # The proxy's lean keep-alive client: per line, urllib3 cost more than the line's work.
        self.engines = EngineClient(limits.chunk_parallel * 2, connect_timeout, read_timeout)
        self._status: dict[str, tuple[float, str | None]] = {}
        self._caps: tuple[float, dict[str, int]] = (0.0, {})
        self._writers: dict[str, tuple[LineWriter[LineResult], int]] = {}
        self._writers_lock = threading.Lock()

    def run_chunk(self, job_id: str, first: int, end: int, offset: int) -> float | None:
        """Run the chunk's lines not yet done; return a countdown if it must come back later."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job["status"] not in RUNNING_STATUSES:
            self.close_chunk(job, first)
            return None
        if self._waits_for_budget(job):
            return BUDGET_RECHECK_SECONDS
        kind = self.kinds[job["kind"]]
        self._owners[job_id] = {name: job.get(name)
                                for name in ("owner", "project", "kind", "budgets")}
        lines = kind.lines(job, first, end, offset)
        done = self.jobs.done_lines(job_id, [n for n, _ in lines])
        todo = [(n, line) for n, line in lines if n not in done]
        waiting = [(n, line) for n, line in todo
                   if not all(self.router.ready(self.served_by(model))
                              for model in line_models(line))]
        runnable = [item for item in todo if item not in waiting]
        left = list(waiting)
        if runnable:
            kind.started(job)
            with self._writer(job_id) as writer:
                handed = self._dispatch(job, kind, runnable, writer)
                numbers = [n for n in handed if n is not None]
                if numbers:
                    writer.wait(min(numbers), max(numbers))
            left += [item for item, number in zip(runnable, handed, strict=True)
                     if number is None]
        if left and self.still_running(job_id):
            return REQUEUE_SECONDS
        self.close_chunk(self.jobs.get(job_id), first)
        return None

    @contextlib.contextmanager
    def _writer(self, job_id: str) -> Iterator[LineWriter[LineResult]]:
        """The job's line writer in this process, shared by its chunks running here."""
        with self._writers_lock:
            writer, users = self._writers.get(job_id, (None, 0))
            if writer is None:
                writer = LineWriter(lambda results: self._store(job_id, results))
            self._writers[job_id] = (writer, users + 1)
        try:
            yield writer
        finally:
            with self._writers_lock:
                users = self._writers[job_id][1] - 1
                if users:
                    self._writers[job_id] = (writer, users)
                else:
                    del self._writers[job_id]
                    self._owners.pop(job_id, None)

    def _dispatch(self, job: dict, kind: JobKind, items: list[tuple[int, dict]],
                  writer: LineWriter[LineResult]) -> list[int | None]:
        """Run `items`, at most `chunk_parallel` at a time, each started once it holds the
        admission lease of its first engine call: while the cap is full, a chunk waits for it
        as one thread, not as a thread per line (thousands, each holding a stack). Returns,
        per line, its number in `writer` or None if it did not finish."""
        job_id = job["id"]
        slots = threading.Semaphore(self.limits.chunk_parallel)
        futures = []

        def run(number: int, line: dict, lease: str | None) -> int | None:
            try:
                return self._run_line(job, kind, number, line, writer, lease)
            finally:
                slots.release()

        with ThreadPoolExecutor(min(self.limits.chunk_parallel, len(items))) as pool:
            for number, line in items:
                slots.acquire()
                lease = None
                if line.get("body") is not None:
                    if self.still_running(job_id):
                        lease = self.admission.acquire(self.served_by(line["body"]["model"]),
                                                       job.get("priority") or 0,
                                                       lambda: self.still_running(job_id))
                    if lease is None:  # the job stopped: dispatch no more
                        slots.release()
                        break
                futures.append(pool.submit(run, number, line, lease))
        return ([future.result() for future in futures]
                + [None] * (len(items) - len(futures)))

    def _waits_for_budget(self, job: dict) -> bool:
        """Whether the job's owner is over a daily budget: its lines then wait (the job says
        why in `waiting_reason`) instead of failing; the reason goes once the day frees."""
        reason = over_daily(self.jobs.redis, job.get("budgets") or [])
        if reason != job.get("waiting_reason"):
            self.jobs.update(job["id"], waiting_reason=reason)
        return reason is not None

    def served_by(self, model: str) -> str:
        """The catalog model whose engines serve `model`: itself, or a LoRA adapter's base (its
        admission, its queue and its engines are the base's)."""
        adapter = self.catalog.adapter(model)
        return adapter.base if adapter is not None else model

    def still_running(self, job_id: str) -> bool:
        """Whether the job still takes lines, as read at most STATE_CACHE_SECONDS ago."""
        now = time.monotonic()
        seen, status = self._status.get(job_id, (0.0, None))
        if now - seen > STATE_CACHE_SECONDS:
            if len(self._status) > STATUS_CACHE_SIZE:  # a long-lived worker sees many jobs
                self._status = {job: entry for job, entry in self._status.items()
                                if now - entry[0] <= STATE_CACHE_SECONDS}
            if seen:  # lines that find it stale meanwhile use the old value: one read, no herd
                self._status[job_id] = (now, status)
            status = self.jobs.status(job_id)
            self._status[job_id] = (now, status)
        return status in RUNNING_STATUSES

    def _run_line(self, job: dict, kind: JobKind, number: int, line: dict,
                  writer: LineWriter[LineResult], lease: str | None = None) -> int | None:
        """Run one line (its first engine call under `lease`, taken for it and given back
        here). When it finished, its result is handed to `writer` to be stored once: return its
        number there; None when it must run again later."""
        try:
            ok, payload = (self._call(job, line, lease) if line.get("body") is not None
                           else (True, None))
            ok, payload, tally = kind.finish_line(job, number, line, ok, payload, self.request)
        except JobStopped:
            return None
        except Transient as exc:
            attempts = self.jobs.note_attempt(job["id"], number)
            if attempts < self.limits.line_attempts:
                log.info("line %d of %s will be retried (%s)", number, job["id"], exc)
                return None
            ok, payload, tally = kind.finish_line(
                job, number, line, False, error_line(line, "engine_error", str(exc)),
                self.request)
        return writer.add(LineResult(number, line_models(line), ok, payload, tally))

    def _store(self, job_id: str, results: list[LineResult]) -> None:
        stored = self.jobs.record_lines(job_id, results)
        if self.on_usage is not None and job_id in self._owners:
            fresh = [result for result, new in zip(results, stored, strict=True) if new]
            if fresh:
                self.on_usage(self._owners[job_id], fresh)
        if self.on_line is not None:
            for result, fresh in zip(results, stored, strict=True):
                if fresh and result.models:
                    self.on_line(result.models[0], result.ok)

    def _lease(self, job: dict, model: str) -> str:
        """An admission lease for one call to `model`; JobStopped if the job stops meanwhile."""
        job_id = job["id"]
        lease = None
        if self.still_running(job_id):
            lease = self.admission.acquire(model, job.get("priority") or 0,
                                           lambda: self.still_running(job_id))
        if lease is None:
            raise JobStopped(job_id)
        return lease

    def _cap(self, model: str) -> int:
        """Lines of `model` allowed in flight: set by the autoscaler; else a default per engine."""
        now = time.monotonic()
        seen, caps = self._caps
        if now - seen > STATE_CACHE_SECONDS:
            caps = self.router.registry.batch_caps()
            self._caps = (now, caps)
        cap = caps.get(model)
        if cap is not None:
            return max(1, cap)
        spec = self.catalog.get(model)
        per_engine = (batch_per_engine(spec, self.limits.per_runtime_cap) if spec
                      else self.limits.per_runtime_cap)
        return per_engine * max(1, len(self.router.ready(model)))

    def _call(self, job: dict, line: dict, lease: str | None) -> tuple[bool, dict]:
        answer = self.request(job, line["body"]["model"], line["url"], line["body"], lease)
        result = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                  "response": {"status_code": answer.status, "request_id": answer.request_id,
                               "body": answer.body},
                  "error": None}
        return answer.status < 400, result

    def request(self, job: dict, model: str, url: str, body: dict,
                lease: str | None = None) -> EngineAnswer:
        """POST `body` to a ready engine of `model`, under that model's admission lease (this
        one, taken already, or one waited for here); the lease is given back before returning.
        Raises Transient when the engine cannot answer now, JobStopped when the job stops."""
        base = self.served_by(model)
        if lease is None:
            lease = self._lease(job, base)
        try:
            return self._post(model, url, self._prioritised(job, base, body))
        finally:
            self.admission.release(base, lease)

    def _prioritised(self, job: dict, model: str, body: dict) -> dict:
        """The body with the engine priority of this job's work (batch lines and eval samples
        rank below every realtime call, and by the job's priority among themselves)."""
        spec = self.catalog.get(model)
        if spec is None:
            return body
        body = dict(body)  # the stored line stays as the caller wrote it
        priority = min(max(int(job.get("priority") or 0), JOB_PRIORITIES[0]), JOB_PRIORITIES[-1])
        set_engine_priority(spec, body, BATCH, priority)
        return body

    def _post(self, model: str, url: str, body: dict) -> EngineAnswer:
        adapter = self.catalog.adapter(model)
        if adapter is None:
            record = self.router.pick(model, {})
        else:
            ready = self.router.ready(adapter.base)
            record = self.router.pick(adapter.base, {},
                                      prefer=self.adapters.loaded_on(ready, adapter.id))
        if record is None:
            raise Transient("no ready engine")
        if adapter is not None:
            try:
                self.adapters.ensure(record, self.catalog.get(adapter.base), adapter)
            except AdapterLoadError as exc:
                raise Transient(str(exc)) from None
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        try:
            response = self.engines.send_to(record, url, json.dumps(body).encode(), request_id)
            data = response.read()
        except (EngineUnreachable, EngineBrokeOff, EngineTimeout) as exc:
            self.router.invalidate()
            raise Transient(f"engine unreachable: {type(exc).__name__}") from None
        if response.status >= 500:
            raise Transient(f"engine answered {response.status}")
        if adapter is not None and response.status == 404 and b"does not exist" in data:
            # The engine lost the adapter (it restarted): forget it there; the retry loads it.
            self.adapters.forget(record, adapter)
            raise Transient(f"the engine had lost the adapter {adapter.id}")
        if response.status >= 400:
            # The error line's body in the API's envelope, as a realtime caller would get it.
            return EngineAnswer(response.status, request_id,
                                json.loads(normalise_engine_error(response.status, data)))
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {"error": {"message": data.decode(errors="replace")[:500],
                                "type": "server_error", "code": "engine_error", "param": None}}
        return EngineAnswer(response.status, request_id, answer)
