"""Evals and their runs: what the API asks for, and the step that starts a run on the batch queue.

A run is a JobStore job of kind `eval_run` (statuses `queued`, `in_progress`, `completed`,
`canceled`, `failed`) holding a snapshot of the eval's testing criteria and item schema, so that
editing or deleting the eval cannot change a run under way. `prepare` (a task on the `batch`
queue) writes the run's items file from its source, checking each item against the schema, cuts
it into chunks and sends them as ordinary chunk messages; `jobs.eval_kind.EvalRunKind` does
the lines. Output items stay in Redis with the run (unlike a batch's results, which go to files)
until the run or its eval is deleted; `output_items` pages through them in item order.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from jobs.eval_definitions import DefinitionError, item_checker, split_row
from jobs.eval_kind import line_of, run_models
from jobs.eval_store import EvalStore
from jobs.files import FileStore
from jobs.lifecycle import JobQueue
from jobs.limits import BatchLimits
from jobs.store import JobStore
from jobs.tenancy import DEFAULT_PROJECT, UnknownCursor

log = logging.getLogger(__name__)

OPEN = ("queued", "in_progress")
RUN_STATUSES = ("queued", "in_progress", "completed", "canceled", "failed")
# How many stored results a filtered page reads at a time while looking for matches.
SCAN_BLOCK = 500


class SourceError(ValueError):
    """The run's data cannot be used; the run fails with this code and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EvalService:
    def __init__(self, store: EvalStore, jobs: JobStore, files: FileStore, items_dir: Path,
                 limits: BatchLimits, queue: JobQueue):
        self.store = store
        self.jobs = jobs
        self.files = files
        self.items_dir = Path(items_dir)
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.queue = queue

    # -- evals -----------------------------------------------------------------------------

    def delete_eval(self, eval_id: str) -> None:
        """An eval goes with its runs: open ones are cancelled first."""
        for run_id in self.store.run_ids(eval_id):
            self.delete_run(run_id)
        self.store.delete(eval_id)

    # -- creating a run --------------------------------------------------------------------

    def create_run(self, owner: str, definition: dict, parsed: dict, priority: int,
                   project: str = DEFAULT_PROJECT) -> dict:
        """A queued run of `definition` from a checked body (`eval_definitions.parse_run`).
        Inline rows (`file_content`) are checked and written now: a bad one is a 400."""
        source = parsed["data_source"]["source"]
        items_file = None
        if source["type"] == "file_content":
            rows = source["content"]
            if not rows:
                raise DefinitionError("'data_source.source.content' holds no rows.",
                                      "data_source.source.content")
            try:
                items_file = self._write_items(self._checked_rows(
                    enumerate(rows), definition["item_schema"], "content row"))
            except SourceError as exc:
                raise DefinitionError(exc.message, "data_source.source.content") from None
        elif self.files.get(source["id"], project) is None:
            raise DefinitionError(f"No such file: {source['id']}", "data_source.source.id")
        run_id = self.jobs.create("eval_run", owner, {
            "status": "queued", "eval_id": definition["id"],
            "name": parsed["name"] or _default_name(parsed), "metadata": parsed["metadata"],
            "data_source": parsed["data_source"], "model": parsed["model"], "priority": priority,
            "testing_criteria": definition["testing_criteria"],
            "item_schema": definition["item_schema"], "items_file": items_file, "total": 0,
        }, project)
        self.store.add_run(definition["id"], run_id)
        job = self.jobs.get(run_id)
        self.queue.send_preparation("eval_run", run_id)
        return job

    def _checked_rows(self, rows: Iterable[tuple[int, object]], item_schema: dict,
                      what: str) -> Iterator[dict]:
        """Rows as {"item", "sample"}; SourceError naming the first bad one as `what` and its
        number (inline content counts from 0, as its list does; a file's lines from 1)."""
        check = item_checker(item_schema)
        count = 0
        for where, row in rows:
            try:
                item, sample = split_row(row)
            except ValueError as exc:
                raise SourceError("invalid_item", f"{what} {where}: {exc}") from None
            problem = check(item)
            if problem is not None:
                raise SourceError("invalid_item", f"{what} {where}: {problem}")
            count += 1
            if count > self.limits.max_lines:
                raise SourceError("too_many_items", f"more than {self.limits.max_lines} items")
            yield {"item": item, "sample": sample}

    def _write_items(self, rows: Iterable[dict]) -> str:
        """Write the rows to a new items file (whole, or not at all); return its name."""
        name = f"items-{uuid.uuid4().hex}.jsonl"
        partial = self.items_dir / f"{name}.part"
        try:
            with open(partial, "wb") as out:
                for row in rows:
                    out.write(json.dumps(row).encode() + b"\n")
            partial.replace(self.items_dir / name)
        finally:
            partial.unlink(missing_ok=True)
        return name

    # -- preparing a run (worker) ----------------------------------------------------------

    def prepare(self, run_id: str) -> None:
        """Write the items file of a file source, cut it into chunks and send them. Safe to
        run twice: only a `queued` run is prepared, and a redelivered message that finds the
        run in progress leaves its chunks to the stall sweep."""
        job = self.jobs.get(run_id)
        if job is None or job["status"] != "queued":
            return
        try:
            items_file = job.get("items_file") or self._items_from_file(job)
            count, chunks = self._chunks(items_file)
        except SourceError as exc:
            self.jobs.update(run_id, error={"code": exc.code, "message": exc.message})
            if self.jobs.transition(run_id, ("queued",), "failed", "failed_at"):
                self.jobs.close(run_id)
            return
        if not self.jobs.start(run_id, ("queued",), "in_progress", "in_progress_at",
                               {"items_file": items_file, "total": count,
                                "chunks_total": len(chunks), "chunks": [list(c) for c in chunks],
                                "progress_at": int(time.time())},
                               {model: count for model in run_models(job)}):
            return  # cancelled meanwhile, or prepared by another delivery of the message
        for first, end, offset in chunks:
            self.queue.send_chunk(run_id, first, end, offset, job.get("priority") or 0)

    def _items_from_file(self, job: dict) -> str:
        file_id = job["data_source"]["source"]["id"]
        path = self.files.path(file_id)
        if self.files.get(file_id) is None or not path.exists():
            raise SourceError("file_not_found", f"the file {file_id} no longer exists")

        def rows() -> Iterator[tuple[int, object]]:
            with open(path, "rb") as fh:
                for number, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        yield number, json.loads(raw)
                    except ValueError:
                        raise SourceError("invalid_json",
                                          f"line {number} is not valid JSON") from None

        return self._write_items(self._checked_rows(rows(), job["item_schema"], "line"))

    def _chunks(self, items_file: str) -> tuple[int, list[tuple[int, int, int]]]:
        """(items, chunks as (first line, end line, byte offset)) of an items file."""
        chunks: list[tuple[int, int, int]] = []
        count = offset = 0
        with open(self.items_dir / items_file, "rb") as fh:
            for raw in fh:
                if count % self.limits.chunk_lines == 0:
                    chunks.append((count, count, offset))
                count += 1
                offset += len(raw)
                chunks[-1] = (chunks[-1][0], count, chunks[-1][2])
        if not count:
            raise SourceError("empty_source", "the data source holds no items")
        return count, chunks

    # -- a run's life ----------------------------------------------------------------------

    def cancel_run(self, run_id: str) -> dict | None:
        """Stop dispatching the run's lines; what is graded stays, lines in flight still land."""
        if self.jobs.transition(run_id, OPEN, "canceled", "cancelled_at"):
            self.jobs.close(run_id)
        return self.jobs.get(run_id)

    def delete_run(self, run_id: str) -> None:
        job = self.jobs.get(run_id)
        if job is None:
            return
        self.cancel_run(run_id)
        self.store.remove_run(job["eval_id"], run_id)
        self.jobs.delete(run_id)
        if job.get("items_file"):
            (self.items_dir / job["items_file"]).unlink(missing_ok=True)

    def list_runs(self, eval_id: str, after: str | None, limit: int, order: str,
                  status: str | None) -> tuple[list[dict], bool]:
        if status is None:
            ids, has_more = self.store.page_runs(eval_id, after, limit, order)
            return [j for j in (self.jobs.get(i) for i in ids) if j is not None], has_more
        # Few runs per eval: filtering the whole list is cheap.
        ids, _ = self.store.page_runs(eval_id, after, 1_000_000, order)
        jobs = [j for j in (self.jobs.get(i) for i in ids) if j and j["status"] == status]
        return jobs[:limit], len(jobs) > limit

    # -- output items ----------------------------------------------------------------------

    def output_items(self, run_id: str, status: str | None, after: str | None, limit: int,
                     order: str) -> tuple[list[dict], bool]:
        """A page of the run's output items in item order. Passes and fails are both in the
        `out` results (graded), errors in `err`: a `pass`/`fail` page reads `out` in order
        until it is full."""
        which = {"error": ("err",), "pass": ("out",), "fail": ("out",)}.get(status,
                                                                             ("out", "err"))
        numbers = sorted({n for part in which for n in self.jobs.result_numbers(run_id, part)},
                         reverse=order == "desc")
        if after is not None:
            cursor = line_of(run_id, after)
            if cursor is None:
                raise UnknownCursor(after)
            numbers = [n for n in numbers if (n < cursor if order == "desc" else n > cursor)]
        size = SCAN_BLOCK if status in ("pass", "fail") else limit + 1
        found: list[dict] = []
        for start in range(0, len(numbers), size):
            for item in self._results(run_id, numbers[start:start + size], which):
                if status in (None, "error") or item["status"] == status:
                    found.append(item)
            if len(found) > limit:
                break
        return found[:limit], len(found) > limit

    def output_item(self, run_id: str, item_id: str) -> dict | None:
        number = line_of(run_id, item_id)
        if number is None:
            return None
        result = self.jobs.line_result(run_id, number)
        return result[1] if result else None

    def _results(self, run_id: str, numbers: list[int], which: tuple[str, ...]) -> list[dict]:
        if not numbers:
            return []
        values = [self.jobs.results(run_id, part, numbers) for part in which]
        items = []
        for i in range(len(numbers)):
            raw = next((v[i] for v in values if v[i] is not None), None)
            if raw is not None:
                items.append(json.loads(raw))
        return items


def _default_name(parsed: dict) -> str:
    kind = parsed["data_source"]["type"]
    return f"{kind} run of {parsed['model']}" if parsed["model"] else f"{kind} run"
