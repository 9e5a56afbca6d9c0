"""Batch work: OpenAI-style batches from JSONL files, and single batch completions.

A batch is validated in one pass over its input file (streamed), then cut into chunks of lines;
each chunk is one Celery message with the batch's priority. A chunk runs its lines concurrently,
each under an admission lease of its model (the autoscaler lowers the cap when realtime traffic
needs the engine), and stores each result exactly once in the job store. A chunk whose model has
no ready engine is put back with a countdown instead of holding a worker, and its waiting lines
are the model's queue depth, which makes the autoscaler start the engine. Transient engine
failures (refused, reset, 5xx) leave a line to be retried, not failed.

When every chunk is closed (or the batch is cancelled or expires) the results are written to
the output and error files, streamed from Redis, and the batch reaches its final state.

Other kinds of job (eval runs) ride the same chunks, priorities, leases, retries and sweep
through a `JobKind` registered in `kinds`: it supplies the lines and post-processes each
line's answer (more engine calls included) before the result is stored, and ends the job.
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
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from runtimes.catalog import ModelCatalog
from runtimes.engine_errors import normalise_engine_error
from runtimes.leases import LeaseSet
from runtimes.policy import batch_per_engine
from runtimes.routing import RuntimeRouter
from runtimes.upstream import EngineBrokeOff, EngineClient, EngineTimeout, EngineUnreachable
from tasks.admission import AdmissionGate
from tasks.batch_line import LineProblem, parse_line
from tasks.filestore import FileStore
from tasks.jobstore import JobStore, LineResult
from tasks.linewriter import LineWriter
from tasks.tenancy import DEFAULT_PROJECT

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
WINDOWS = {"24h": 24 * 3600}
MAX_REPORTED_ERRORS = 100
# Seconds a chunk waits before looking again for its model's engine, or after a transient error.
REQUEUE_SECONDS = 3.0
# The statuses of a job before its chunks exist: a batch being validated, an eval run being
# prepared.
PREPARING = ("validating", "queued")
# How long a worker trusts what it read of a job's status and the admission caps: every line
# checks both, and a cancel need only stop dispatch "quickly", not within a microsecond.
STATE_CACHE_SECONDS = 0.5
# Jobs whose status a worker remembers before it forgets those it has not looked at lately.
STATUS_CACHE_SIZE = 1000


@dataclass(frozen=True)
class BatchLimits:
    max_lines: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    chunk_lines: int = 100
    chunk_parallel: int = 32
    line_attempts: int = 5
    per_runtime_cap: int = 64
    cancel_grace_seconds: float = 60.0
    # A running job with no line done for this long has lost chunk messages (a Redis restart,
    # a worker gone while its broker connection was down): its open chunks are sent again.
    stall_seconds: float = 600.0


class Transient(Exception):
    """The engine could not answer now; try the line again later."""


class JobStopped(Exception):
    """The job left its running states while a line waited for an admission lease."""


class EngineAnswer(NamedTuple):
    status: int
    request_id: str
    body: dict


class JobKind(Protocol):
    """A kind of job whose lines are not a batch file's requests (eval runs): it supplies its
    lines and turns each line's engine answer into the result that is stored.

    A line is a dict with `custom_id`, `url` and `body` (the engine request; None for a line
    that needs no engine call of its own) and optionally `models`: every model whose engine the
    line needs (default: the body's model). The line waits until all of them are ready, and
    counts in each one's queue depth until it is recorded.
    """

    def lines(self, job: dict, first: int, end: int,
              offset: int) -> list[tuple[int, dict]]: ...

    def finish_line(self, job: dict, number: int, line: dict, ok: bool,
                    payload: dict | None) -> tuple[bool, dict, dict[str, int] | None]:
        """(ok, result to store, tally) from the engine's answer (`payload` as a batch line's
        result; None when the line had no body). May call engines through
        `BatchService.request` (raising Transient to have the line retried), except when `ok`
        is False: a failed line is only written up."""
        ...

    def finalize(self, job: dict) -> None:
        """Every chunk of the job is closed: reach the final state, exactly once."""
        ...


def line_models(line: dict) -> list[str]:
    """The models a line needs (the first is the one its metrics count it for); it counts in
    the queue depth of each until it is recorded."""
    return line["models"] if "models" in line else [line["body"]["model"]]


class BatchService:
    def __init__(self, jobs: JobStore, files: FileStore, catalog: ModelCatalog,
                 router: RuntimeRouter, limits: BatchLimits,
                 enqueue_chunk: Callable[..., None], validate_line: Callable[[str, dict], None],
                 connect_timeout: float = 5.0, read_timeout: float = 600.0):
        self.jobs = jobs
        self.files = files
        self.catalog = catalog
        self.router = router
        self.limits = limits
        self.enqueue_chunk = enqueue_chunk
        # Checks a request body for an endpoint; raises ValueError naming the bad field.
        self.validate_line = validate_line
        self.admission = AdmissionGate(
            LeaseSet(jobs.redis, f"{jobs.prefix}:batch_inflight", lease_seconds=read_timeout + 60),
            self._cap, sync_seconds=STATE_CACHE_SECONDS)
        # The proxy's lean keep-alive client: per line, urllib3 cost more than the line's work.
        self.engines = EngineClient(limits.chunk_parallel * 2, connect_timeout, read_timeout)
        self._status: dict[str, tuple[float, str | None]] = {}
        # Told (model, ok) once per line stored, in the worker that ran it: metrics.
        self.on_line: Callable[[str, bool], None] | None = None
        self._caps: tuple[float, dict[str, int]] = (0.0, {})
        self._writers: dict[str, tuple[LineWriter[LineResult], int]] = {}
        self._writers_lock = threading.Lock()
        # Job kinds other than batches and single completions, by the job's `kind`.
        self.kinds: dict[str, JobKind] = {}
        # Sends the message that validates (prepares) a job of a kind, by the job's `kind`: the
        # sweep sends it again when it was lost.
        self.preparers: dict[str, Callable[[str], None]] = {}

    # -- creating --------------------------------------------------------------------------

    def create_batch(self, owner: str, input_file_id: str, endpoint: str, window: str,
                     metadata: dict | None, priority: int,
                     allowed_models: list[str] | None = None,
                     project: str = DEFAULT_PROJECT) -> dict:
        now = int(time.time())
        return batch_object(self.jobs.get(self.jobs.create("batch", owner, {
            "status": "validating", "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window, "metadata": metadata, "priority": priority,
            "expires_at": now + WINDOWS[window], "total": 0, "allowed_models": allowed_models,
        }, project)))

    def create_completion(self, owner: str, endpoint: str, body: dict, priority: int,
                          project: str = DEFAULT_PROJECT) -> dict:
        job_id = self.jobs.create("completion", owner, {
            "status": "queued", "endpoint": endpoint, "body": body, "model": body["model"],
            "priority": priority, "total": 1, "chunks_total": 1, "chunks": [[0, 1, 0]],
        }, project)
        self.jobs.add_pending(job_id, {body["model"]: 1})
        job = self.jobs.get(job_id)  # as submitted: a worker may take it the moment it is sent
        self.enqueue_chunk(job_id, 0, 1, 0, priority)
        return job

    # -- validating ------------------------------------------------------------------------

    def validate(self, batch_id: str) -> None:
        job = self.jobs.get(batch_id)
        if job is None or job["status"] != "validating":
            return
        errors: list[dict] = []
        seen: set[str] = set()
        per_model: dict[str, int] = {}
        chunks: list[tuple[int, int, int]] = []  # first line, end line, byte offset
        count = 0
        offset = 0
        chunk_start, chunk_offset = 0, 0
        path = self.files.path(job["input_file_id"])
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                line_offset = offset
                offset += len(raw)
                if not raw.strip():
                    continue
                problem = self._check_line(raw, job["endpoint"], seen, per_model,
                                           job.get("allowed_models"))
                if problem is not None:
                    if len(errors) < MAX_REPORTED_ERRORS:
                        errors.append({**problem, "line": number})
                    continue
                if count % self.limits.chunk_lines == 0:
                    if count:
                        chunks.append((chunk_start, number - 1, chunk_offset))
                    chunk_start, chunk_offset = number - 1, line_offset
                count += 1
                if count > self.limits.max_lines:
                    errors.append({"code": "too_many_lines", "line": number, "param": None,
                                   "message": f"more than {self.limits.max_lines} lines"})
                    break
        if count:
            chunks.append((chunk_start, number, chunk_offset))
        if not count and not errors:
            errors.append({"code": "empty_file", "line": None, "param": None,
                           "message": "the input file holds no requests"})
        if errors:
            self.jobs.update(batch_id, errors={"object": "list", "data": errors})
            self.jobs.transition(batch_id, ("validating",), "failed", "failed_at")
            self.jobs.close(batch_id)
            return
        fields = {"total": count, "chunks_total": len(chunks), "chunks": [list(c) for c in chunks],
                  "progress_at": int(time.time())}
        if not self.jobs.start(batch_id, ("validating",), "in_progress", "in_progress_at",
                               fields, per_model):
            return  # cancelled while validating, or validated by another delivery of the message
        for first, end, byte_offset in chunks:
            self.enqueue_chunk(batch_id, first, end, byte_offset, job["priority"])

    def _check_line(self, raw: bytes, endpoint: str, seen: set[str],
                    per_model: dict[str, int], allowed: list[str] | None) -> dict | None:
        def problem(code: str, message: str, param: str | None = None) -> dict:
            return {"code": code, "message": message, "param": param}

        try:
            line = parse_line(raw, endpoint)
        except LineProblem as exc:
            return problem(exc.code, exc.message, exc.param)
        custom_id, body = line["custom_id"], line["body"]
        if custom_id in seen:
            return problem("duplicate_custom_id", f"custom_id {custom_id!r} appears twice",
                           "custom_id")
        model = body.get("model")
        if not isinstance(model, str) or model not in self.catalog:
            return problem("model_not_found", f"model {model!r} is not served here", "body.model")
        if allowed is not None and model not in allowed:
            return problem("model_not_allowed", f"this key may not use model {model!r}",
                           "body.model")
        try:
            self.validate_line(endpoint, body)
        except ValueError as exc:
            return problem("invalid_body", str(exc), "body")
        seen.add(custom_id)
        per_model[model] = per_model.get(model, 0) + 1
        return None

    # -- running ---------------------------------------------------------------------------

    def _lines(self, job: dict, first: int, end: int, offset: int) -> list[tuple[int, dict]]:
        """(line number, request) of the chunk's lines: line numbers count from 1."""
        if job["kind"] in self.kinds:
            return self.kinds[job["kind"]].lines(job, first, end, offset)
        if job["kind"] == "completion":
            return [(1, {"custom_id": job["id"], "url": job["endpoint"], "body": job["body"]})]
        lines = []
        with open(self.files.path(job["input_file_id"]), "rb") as fh:
            fh.seek(offset)
            for number in range(first + 1, end + 1):
                raw = fh.readline()
                if raw.strip():
                    lines.append((number, json.loads(raw)))
        return lines

    def run_chunk(self, job_id: str, first: int, end: int, offset: int) -> float | None:
        """Run the chunk's lines not yet done; return a countdown if it must come back later."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job["status"] not in ("in_progress", "running", "queued"):
            self._close_chunk(job, first)
            return None
        lines = self._lines(job, first, end, offset)
        done = self.jobs.done_lines(job_id, [n for n, _ in lines])
        todo = [(n, line) for n, line in lines if n not in done]
        waiting = [(n, line) for n, line in todo
                   if not all(self.router.ready(model) for model in line_models(line))]
        runnable = [item for item in todo if item not in waiting]
        left = list(waiting)
        if runnable and job["kind"] == "completion":
            self.jobs.transition(job_id, ("queued",), "running", "started_at")
        if runnable:
            with self._writer(job_id) as writer:
                handed = self._dispatch(job, runnable, writer)
                numbers = [n for n in handed if n is not None]
                if numbers:
                    writer.wait(min(numbers), max(numbers))
            left += [item for item, number in zip(runnable, handed, strict=True)
                     if number is None]
        if left and self._still_running(job_id):
            return REQUEUE_SECONDS
        self._close_chunk(self.jobs.get(job_id), first)
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

    def _dispatch(self, job: dict, items: list[tuple[int, dict]],
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
                return self._run_line(job, number, line, writer, lease)
            finally:
                slots.release()

        with ThreadPoolExecutor(min(self.limits.chunk_parallel, len(items))) as pool:
            for number, line in items:
                slots.acquire()
                lease = None
                if line.get("body") is not None:
                    if self._still_running(job_id):
                        lease = self.admission.acquire(line["body"]["model"],
                                                       job.get("priority") or 0,
                                                       lambda: self._still_running(job_id))
                    if lease is None:  # the job stopped: dispatch no more
                        slots.release()
                        break
                futures.append(pool.submit(run, number, line, lease))
        return ([future.result() for future in futures]
                + [None] * (len(items) - len(futures)))

    def _still_running(self, job_id: str) -> bool:
        now = time.monotonic()
        seen, status = self._status.get(job_id, (0.0, None))
        if now - seen > STATE_CACHE_SECONDS:
            if len(self._status) > STATUS_CACHE_SIZE:  # a long-lived worker sees many jobs
                self._status = {job: entry for job, entry in self._status.items()
                                if now - entry[0] <= STATE_CACHE_SECONDS}
            if seen:  # lines that find it stale meanwhile use the old value: one read, no herd
                self._status[job_id] = (now, status)
            raw = self.jobs.redis.hget(self.jobs.key(job_id), "status")
            status = raw.decode() if raw else None
            self._status[job_id] = (now, status)
        return status in ("in_progress", "running", "queued")

    def _run_line(self, job: dict, number: int, line: dict, writer: LineWriter[LineResult],
                  lease: str | None = None) -> int | None:
        """Run one line (its first engine call under `lease`, taken for it and given back
        here). When it finished, its result is handed to `writer` to be stored once: return its
        number there; None when it must run again later."""
        kind = self.kinds.get(job["kind"])
        tally = None
        try:
            ok, payload = (self._call(job, line, lease) if line.get("body") is not None
                           else (True, None))
            if kind is not None:
                ok, payload, tally = kind.finish_line(job, number, line, ok, payload)
        except JobStopped:
            return None
        except Transient as exc:
            attempts = self.jobs.note_attempt(job["id"], number)
            if attempts < self.limits.line_attempts:
                log.info("line %d of %s will be retried (%s)", number, job["id"], exc)
                return None
            ok, payload = False, self._error_line(line, "engine_error", str(exc))
            if kind is not None:
                ok, payload, tally = kind.finish_line(job, number, line, ok, payload)
        return writer.add(LineResult(number, line_models(line), ok, payload, tally))

    def _store(self, job_id: str, results: list[LineResult]) -> None:
        stored = self.jobs.record_lines(job_id, results)
        if self.on_line is not None:
            for result, fresh in zip(results, stored, strict=True):
                if fresh and result.models:
                    self.on_line(result.models[0], result.ok)

    def _lease(self, job: dict, model: str) -> str:
        """An admission lease for one call to `model`; JobStopped if the job stops meanwhile."""
        job_id = job["id"]
        lease = None
        if self._still_running(job_id):
            lease = self.admission.acquire(model, job.get("priority") or 0,
                                           lambda: self._still_running(job_id))
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
        if lease is None:
            lease = self._lease(job, model)
        try:
            return self._post(model, url, body)
        finally:
            self.admission.release(model, lease)

    def _post(self, model: str, url: str, body: dict) -> EngineAnswer:
        record = self.router.pick(model, {})
        if record is None:
            raise Transient("no ready engine")
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        try:
            response = self.engines.send(record.host, record.port, url,
                                         json.dumps(body).encode(), request_id)
            data = response.read()
        except (EngineUnreachable, EngineBrokeOff, EngineTimeout) as exc:
            self.router.invalidate()
            raise Transient(f"engine unreachable: {type(exc).__name__}") from None
        if response.status >= 500:
            raise Transient(f"engine answered {response.status}")
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

    @staticmethod
    def _error_line(line: dict, code: str, message: str) -> dict:
        return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                "response": None, "error": {"code": code, "message": message}}

    # -- ending ----------------------------------------------------------------------------

    def _close_chunk(self, job: dict | None, first: int) -> None:
        if job is None:
            return
        self.jobs.close_chunk(job["id"], first)
        closed = self.jobs.redis.scard(self.jobs.key(job["id"], "chunks"))
        # An expiring batch is finalized by the sweep, once its open lines are marked.
        if closed >= (job.get("chunks_total") or 0) and job["status"] != "expiring":
            self.finalize(job["id"])

    def cancel(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job["kind"] == "completion":
            if self.jobs.transition(job_id, ("queued", "running"), "cancelled", "finished_at"):
                self.jobs.close(job_id)
        elif self.jobs.transition(job_id, ("validating", "in_progress"), "cancelling",
                                  "cancelling_at") and job["status"] == "validating":
            self.finalize(job_id)
        return self.jobs.get(job_id)

    def finalize(self, job_id: str) -> None:
        """Write the output and error files and reach the final state, exactly once."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job["kind"] == "completion":
            self._finish_completion(job)
            return
        if job["kind"] in self.kinds:
            self.kinds[job["kind"]].finalize(job)
            return
        final = {"in_progress": ("completed", "completed_at"),
                 "cancelling": ("cancelled", "cancelled_at"),
                 "expiring": ("expired", "expired_at")}.get(job["status"])
        if final is None or not self.jobs.transition(job_id, (job["status"],), "finalizing",
                                                     "finalizing_at"):
            return
        outputs = {}
        for which, purpose in (("out", "batch_output"), ("err", "batch_output")):
            if self.jobs.redis.hlen(self.jobs.key(job_id, which)):
                # The output belongs to the batch's project, like its input.
                stored = self.files.save(job["owner"], purpose,
                                         f"{job_id}_{'output' if which == 'out' else 'error'}"
                                         ".jsonl", self.jobs.iter_results(job_id, which),
                                         project=job["project"])
                outputs[which] = stored.id
        self.jobs.update(job_id, output_file_id=outputs.get("out"),
                         error_file_id=outputs.get("err"))
        self.jobs.transition(job_id, ("finalizing",), *final)
        self.jobs.close(job_id)
        self.jobs.drop_results(job_id)

    def _finish_completion(self, job: dict) -> None:
        result = self.jobs.line_result(job["id"], 1)
        if result is None:
            return
        ok, payload = result
        response = (payload.get("response") or {}).get("body")
        self.jobs.update(job["id"], response=response,
                         error=None if ok else (payload.get("error") or response))
        if self.jobs.transition(job["id"], ("running", "queued"),
                                "succeeded" if ok else "failed", "finished_at"):
            self.jobs.close(job["id"])

    def sweep(self, now: float | None = None) -> None:
        """Expire batches past their window; finish cancellations whose chunks never came back;
        send again the chunks of a job that has stalled."""
        now = time.time() if now is None else now
        for job in self.jobs.open_jobs():
            self._redispatch_if_stalled(job, now)
            if job["kind"] != "batch":
                continue
            if job["status"] == "in_progress" and (job.get("expires_at") or now) <= now:
                if self.jobs.transition(job["id"], ("in_progress",), "expiring"):
                    self._expire_open_lines(job)
                    self.finalize(job["id"])
            elif (job["status"] == "cancelling"
                  and now - (job.get("cancelling_at") or now) > self.limits.cancel_grace_seconds):
                self.finalize(job["id"])

    def _redispatch_if_stalled(self, job: dict, now: float) -> None:
        last = job.get("progress_at") or job.get("in_progress_at") or job["created_at"]
        if now - last < self.limits.stall_seconds:
            return
        preparer = self.preparers.get(job["kind"])
        if job.get("chunks") is None and preparer is not None and job["status"] in PREPARING:
            # Its validating (preparing) message was lost: send it again. Should the first still
            # run, only one of the two starts the job (`JobStore.start`).
            log.warning("%s still %s after %.0f s: sending its preparation again", job["id"],
                        job["status"], now - last)
            self.jobs.update(job["id"], progress_at=int(now))
            preparer(job["id"])
            return
        if job["status"] not in ("in_progress", "queued", "running"):
            return
        closed = self.jobs.closed_chunks(job["id"])
        open_chunks = [c for c in job.get("chunks") or [] if c[0] not in closed]
        log.warning("%s made no progress for %.0f s: sending %d chunks again", job["id"],
                    now - last, len(open_chunks))
        self.jobs.update(job["id"], progress_at=int(now))
        for first, end, offset in open_chunks:
            self.enqueue_chunk(job["id"], first, end, offset, job.get("priority") or 0)

    def _expire_open_lines(self, job: dict, block: int = 500) -> None:
        def expire(lines: list[tuple[int, dict]]) -> None:
            done = self.jobs.done_lines(job["id"], [number for number, _ in lines])
            self.jobs.record_lines(job["id"], [
                LineResult(number, line_models(line), False,
                           self._error_line(line, "batch_expired",
                                            "the batch expired before this request ran"))
                for number, line in lines if number not in done])

        lines: list[tuple[int, dict]] = []
        with open(self.files.path(job["input_file_id"]), "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if raw.strip():
                    lines.append((number, json.loads(raw)))
                if len(lines) >= block:
                    expire(lines)
                    lines = []
        if lines:
            expire(lines)


def batch_object(job: dict) -> dict:
    """A stored batch job as OpenAI's `Batch` object."""
    status = job["status"]
    if status == "expiring":
        status = "finalizing"
    return {
        "id": job["id"], "object": "batch", "endpoint": job["endpoint"],
        "errors": job.get("errors"), "input_file_id": job["input_file_id"],
        "completion_window": job["completion_window"], "status": status,
        "output_file_id": job.get("output_file_id"), "error_file_id": job.get("error_file_id"),
        "created_at": job["created_at"], "in_progress_at": job.get("in_progress_at"),
        "expires_at": job.get("expires_at"), "finalizing_at": job.get("finalizing_at"),
        "completed_at": job.get("completed_at"), "failed_at": job.get("failed_at"),
        "expired_at": job.get("expired_at"), "cancelling_at": job.get("cancelling_at"),
        "cancelled_at": job.get("cancelled_at"),
        "request_counts": {"total": job.get("total") or 0, "completed": job.get("completed") or 0,
                           "failed": job.get("failed") or 0},
        "metadata": job.get("metadata"),
    }
