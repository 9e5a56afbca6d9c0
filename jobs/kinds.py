"""The kinds of job behind one interface: a batch file, a single completion, an eval run.

Every kind rides the same machinery (chunks of lines, priorities, admission leases, retries,
the stall sweep); a kind says only where its lines come from, what becomes of each line's
engine answer, and how the job ends. A line is a dict with `custom_id`, `url` and `body` (the
engine request; None for a line that needs no engine call of its own) and optionally `models`:
every model whose engine the line needs (default: the body's model). The line waits until all
of them are ready, and counts in each one's queue depth until it is recorded.

The eval run's kind is `jobs.eval_kind.EvalRunKind`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import NamedTuple, Protocol

from jobs.files import FileStore
from jobs.store import JobStore


class EngineAnswer(NamedTuple):
    status: int
    request_id: str
    body: dict


# An engine call of a line beyond its own request (an eval's judge): (job, model, url, body)
# → the answer, made under that model's admission lease; it may raise `Transient` (try the
# line again later) or `JobStopped` (the job left its running states).
EngineRequest = Callable[[dict, str, str, dict], EngineAnswer]


class Transient(Exception):
    """The engine could not answer now; try the line again later."""


class JobStopped(Exception):
    """The job left its running states while a line waited (for a lease, at an engine)."""


class JobKind(Protocol):
    name: str

    def lines(self, job: dict, first: int, end: int,
              offset: int) -> list[tuple[int, dict]]:
        """(line number, line) of the chunk [first, end), read from byte `offset`; numbers
        count from 1."""
        ...

    def started(self, job: dict) -> None:
        """A chunk is about to run its first line (a single completion becomes `running`)."""
        ...

    def finish_line(self, job: dict, number: int, line: dict, ok: bool, payload: dict | None,
                    request: EngineRequest) -> tuple[bool, dict, dict[str, int] | None]:
        """(ok, result to store, tally) from the engine's answer (`payload` as a batch line's
        result; None when the line had no body). May call engines through `request`, except
        when `ok` is False: a failed line is only written up."""
        ...

    def finalize(self, job: dict) -> None:
        """Every chunk of the job is closed (or it was cancelled or expired): reach the final
        state, exactly once."""
        ...


def line_models(line: dict) -> list[str]:
    """The models a line needs (the first is the one its metrics count it for); it counts in
    the queue depth of each until it is recorded."""
    return line["models"] if "models" in line else [line["body"]["model"]]


def error_line(line: dict, code: str, message: str) -> dict:
    """A batch output line for a request that got no answer (retries used up, expired)."""
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
            "response": None, "error": {"code": code, "message": message}}


def read_batch_lines(files: FileStore, job: dict, first: int, end: int,
                     offset: int) -> list[tuple[int, dict]]:
    lines = []
    with open(files.path(job["input_file_id"]), "rb") as fh:
        fh.seek(offset)
        for number in range(first + 1, end + 1):
            raw = fh.readline()
            if raw.strip():
                lines.append((number, json.loads(raw)))
    return lines


class BatchFileKind:
    """An OpenAI batch: lines from its validated input file, results to output files."""

    name = "batch"
    # Each final state, by the state the batch ends from.
    FINAL = {"in_progress": ("completed", "completed_at"),
             "cancelling": ("cancelled", "cancelled_at"),
             "expiring": ("expired", "expired_at")}

    def __init__(self, jobs: JobStore, files: FileStore):
        self.jobs = jobs
        self.files = files

    def lines(self, job: dict, first: int, end: int, offset: int) -> list[tuple[int, dict]]:
        return read_batch_lines(self.files, job, first, end, offset)

    def started(self, job: dict) -> None:
        return None

    def finish_line(self, job, number, line, ok, payload, request):
        return ok, payload, None

    def finalize(self, job: dict) -> None:
        """Write the output and error files and reach the final state, exactly once."""
        job_id = job["id"]
        final = self.FINAL.get(job["status"])
        if final is None or not self.jobs.transition(job_id, (job["status"],), "finalizing",
                                                     "finalizing_at"):
            return
        outputs = {}
        for which in ("out", "err"):
            if self.jobs.result_count(job_id, which):
                # The output belongs to the batch's project, like its input.
                stored = self.files.save(job["owner"], "batch_output",
                                         f"{job_id}_{'output' if which == 'out' else 'error'}"
                                         ".jsonl", self.jobs.iter_results(job_id, which),
                                         project=job["project"])
                outputs[which] = stored.id
        self.jobs.update(job_id, output_file_id=outputs.get("out"),
                         error_file_id=outputs.get("err"))
        self.jobs.transition(job_id, ("finalizing",), *final)
        self.jobs.close(job_id)
        self.jobs.drop_results(job_id)


class CompletionKind:
    """The README's single batch completion: one line, its answer kept on the job."""

    name = "completion"

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    def lines(self, job: dict, first: int, end: int, offset: int) -> list[tuple[int, dict]]:
        return [(1, {"custom_id": job["id"], "url": job["endpoint"], "body": job["body"]})]

    def started(self, job: dict) -> None:
        self.jobs.transition(job["id"], ("queued",), "running", "started_at")

    def finish_line(self, job, number, line, ok, payload, request):
        return ok, payload, None

    def finalize(self, job: dict) -> None:
        result = self.jobs.line_result(job["id"], 1)
        if result is None:  # cancelled before it ran: cancel() has closed it
            return
        ok, payload = result
        response = (payload.get("response") or {}).get("body")
        self.jobs.update(job["id"], response=response,
                         error=None if ok else (payload.get("error") or response))
        if self.jobs.transition(job["id"], ("running", "queued"),
                                "succeeded" if ok else "failed", "finished_at"):
            self.jobs.close(job["id"])
