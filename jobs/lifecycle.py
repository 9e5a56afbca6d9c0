"""A job's life as small transitions: create, validate, close its chunks, finalize, cancel, and
the sweep that expires, finishes and recovers jobs.

A batch is validated in one pass over its input file (streamed), then cut into chunks of lines,
each sent as one message with the batch's priority (`JobQueue`, the effects interface: the
Celery tasks in production, a list in tests). When every chunk is closed, or the batch is
cancelled or expires, its kind finalizes it (`jobs.kinds`). Each transition is a
compare-and-set on the job's status in the store, so a message delivered twice, or two workers
racing, changes nothing twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from jobs.batch_line import LineProblem, parse_line
from jobs.files import FileStore
from jobs.kinds import JobKind, error_line, line_models
from jobs.limits import BatchLimits
from jobs.store import RUNNING_STATUSES, JobStore, LineResult
from jobs.tenancy import DEFAULT_PROJECT
from runtimes.catalog import ModelCatalog
from runtimes.engine_requests import KIND_BY_ENDPOINT

log = logging.getLogger(__name__)

# The urls a batch may use (OpenAI's Batch API allows embeddings and responses too).
ENDPOINTS = tuple(KIND_BY_ENDPOINT)
WINDOWS = {"24h": 24 * 3600}
MAX_REPORTED_ERRORS = 100
# The statuses of a job before its chunks exist: a batch being validated, an eval run being
# prepared.
PREPARING = ("validating", "queued")


class JobQueue(Protocol):
    """Where a job's work is sent to be done later, by some worker."""

    def send_chunk(self, job_id: str, first: int, end: int, offset: int, priority: int,
                   countdown: float = 0) -> None:
        """Run lines [first, end) of the job (read from byte `offset`)."""
        ...

    def send_preparation(self, kind: str, job_id: str) -> None:
        """Validate a batch, or prepare an eval run (its chunks are sent from there)."""
        ...


class JobLifecycle:
    def __init__(self, jobs: JobStore, files: FileStore, catalog: ModelCatalog,
                 limits: BatchLimits, kinds: dict[str, JobKind], queue: JobQueue,
                 validate_body: Callable[[str, dict], None]):
        self.jobs = jobs
        self.files = files
        self.catalog = catalog
        self.limits = limits
        self.kinds = kinds
        self.queue = queue
        # Checks an engine request body for an endpoint; raises ValueError naming the field.
        self.validate_body = validate_body

    # -- creating --------------------------------------------------------------------------

    def create_batch(self, owner: str, input_file_id: str, endpoint: str, window: str,
                     metadata: dict | None, priority: int,
                     allowed_models: list[str] | None = None,
                     project: str = DEFAULT_PROJECT, budgets: list[dict] | None = None) -> dict:
        """A new batch, `validating`; its validation is sent. `budgets`: its owner's daily
        budgets (`jobs.budget_windows`), which its lines count in and wait for."""
        now = int(time.time())
        job_id = self.jobs.create("batch", owner, {
            "status": "validating", "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window, "metadata": metadata, "priority": priority,
            "expires_at": now + WINDOWS[window], "total": 0, "allowed_models": allowed_models,
            "budgets": budgets or [],
        }, project)
        job = self.jobs.get(job_id)
        self.queue.send_preparation("batch", job_id)
        return job

    def create_completion(self, owner: str, endpoint: str, body: dict, priority: int,
                          project: str = DEFAULT_PROJECT,
                          budgets: list[dict] | None = None) -> dict:
        """A new single completion, `queued`, and its one chunk sent."""
        job_id = self.jobs.create("completion", owner, {
            "status": "queued", "endpoint": endpoint, "body": body, "model": body["model"],
            "priority": priority, "total": 1, "chunks_total": 1, "chunks": [[0, 1, 0]],
            "budgets": budgets or [],
        }, project)
        self.jobs.add_pending(job_id, {body["model"]: 1})
        job = self.jobs.get(job_id)  # as submitted: a worker may take it the moment it is sent
        self.queue.send_chunk(job_id, 0, 1, 0, priority)
        return job

    # -- validating ------------------------------------------------------------------------

    def validate(self, batch_id: str) -> None:
        """Check every line of a `validating` batch; fail it with the problems and their line
        numbers, or start it (totals, chunks, queue depth, status in one step) and send its
        chunks."""
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
        number = 0
        with open(self.files.path(job["input_file_id"]), "rb") as fh:
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
            self.queue.send_chunk(batch_id, first, end, byte_offset, job["priority"])

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
        adapter = self.catalog.adapter(model) if isinstance(model, str) else None
        if not isinstance(model, str) or (model not in self.catalog and adapter is None):
            return problem("model_not_found", f"model {model!r} is not served here", "body.model")
        if allowed is not None and model not in allowed:
            return problem("model_not_allowed", f"this key may not use model {model!r}",
                           "body.model")
        # A LoRA adapter's lines are its base's work (its engines, its queue depth).
        served_by = adapter.base if adapter is not None else model
        kind = self.catalog.get(served_by).kind
        if kind != KIND_BY_ENDPOINT[endpoint]:
            return problem("model_kind_mismatch", f"model {model!r} is a {kind} model; "
                           f"{endpoint} needs a {KIND_BY_ENDPOINT[endpoint]} model",
                           "body.model")
        if body.get("stream") is True:
            return problem("invalid_body", "a batch line cannot be streamed", "body.stream")
        try:
            self.validate_body(endpoint, body)
        except ValueError as exc:
            return problem("invalid_body", str(exc), "body")
        seen.add(custom_id)
        per_model[served_by] = per_model.get(served_by, 0) + 1
        return None

    # -- ending ----------------------------------------------------------------------------

    def close_chunk(self, job: dict | None, first: int) -> None:
        """A chunk has nothing left to run: count it closed (once), and finalize the job when
        it was the last."""
        if job is None:
            return
        self.jobs.close_chunk(job["id"], first)
        # An expiring batch is finalized by the sweep, once its open lines are marked.
        if (len(self.jobs.closed_chunks(job["id"])) >= (job.get("chunks_total") or 0)
                and job["status"] != "expiring"):
            self.finalize(job["id"])

    def finalize(self, job_id: str) -> None:
        """Reach the job's final state through its kind, exactly once."""
        job = self.jobs.get(job_id)
        if job is not None:
            self.kinds[job["kind"]].finalize(job)

    def cancel(self, job_id: str) -> dict | None:
        """Stop a job: a single completion at once, a batch through `cancelling` (its lines in
        flight still land); what was done stays."""
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

    # -- the sweep ---------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        """Expire batches past their window; finish cancellations whose chunks never came back;
        send again the work of a job that has stalled."""
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
        if job.get("chunks") is None and job["kind"] != "completion" \
                and job["status"] in PREPARING:
            # Its validating (preparing) message was lost: send it again. Should the first still
            # run, only one of the two starts the job (`JobStore.start`).
            log.warning("%s still %s after %.0f s: sending its preparation again", job["id"],
                        job["status"], now - last)
            self.jobs.update(job["id"], progress_at=int(now))
            self.queue.send_preparation(job["kind"], job["id"])
            return
        if job["status"] not in RUNNING_STATUSES:
            return
        closed = self.jobs.closed_chunks(job["id"])
        open_chunks = [c for c in job.get("chunks") or [] if c[0] not in closed]
        log.warning("%s made no progress for %.0f s: sending %d chunks again", job["id"],
                    now - last, len(open_chunks))
        self.jobs.update(job["id"], progress_at=int(now))
        for first, end, offset in open_chunks:
            self.queue.send_chunk(job["id"], first, end, offset, job.get("priority") or 0)

    def _expire_open_lines(self, job: dict, block: int = 500) -> None:
        """Every line of an expiring batch not yet done goes to its error file."""
        def expire(lines: list[tuple[int, dict]]) -> None:
            done = self.jobs.done_lines(job["id"], [number for number, _ in lines])
            self.jobs.record_lines(job["id"], [
                LineResult(number, line_models(line), False,
                           error_line(line, "batch_expired",
                                      "the batch expired before this request ran"))
                for number, line in lines if number not in done])

        lines: list[tuple[int, dict]] = []
        with open(self.files.path(job["input_file_id"]), "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if raw.strip():
                    lines.append((number, json.loads(raw)))  # validated already
                if len(lines) >= block:
                    expire(lines)
                    lines = []
        if lines:
            expire(lines)
