"""The OpenAI Batches API (`/v1/batches`, scope `batch`), so the official SDK works unchanged.

A batch belongs to the project of the key that made it: keys of that project with `batch` (or
`monitor`, to read) see it; to another project it does not exist (404). Besides OpenAI's
fields, a create call may give `priority` (0-9, larger runs sooner; default 0), in the body or
in `metadata.priority`.
"""

from __future__ import annotations

from flask import Blueprint, g

from jobs.budget_windows import daily_budgets
from jobs.tenancy import UnknownCursor
from webapp.apidoc import PageQuery, accepts, documented
from webapp.arguments import BatchCreate
from webapp.auth import require_scope
from webapp.context import services
from webapp.errors import APIError
from webapp.paging import page, unknown_cursor
from webapp.serializers import batch_object

bp = Blueprint("batches", __name__)

# Final states a cancel cannot undo (a cancelled job is cancelled again harmlessly).
DONE_STATUSES = ("completed", "failed", "expired", "succeeded")


def owned_job(job_id: str, kind: str) -> dict:
    """The job if it is of `kind` and of this key's project; else 404 (never 403: another
    project's job is not revealed)."""
    job = services().jobs.get(job_id, g.api_key.project)
    if job is None or job["kind"] != kind:
        raise APIError(404, f"No such {kind}: {job_id}", code=f"{kind}_not_found")
    return job


def cancellable(job: dict, what: str) -> None:
    """409 for a job that has already finished: there is nothing left to cancel."""
    if job["status"] in DONE_STATUSES:
        raise APIError(409, f"The {what} is already {job['status']}; it cannot be cancelled.",
                       code="not_cancellable")


@bp.post("/v1/batches")
@require_scope("batch")
@accepts(BatchCreate(), summary="Create a batch from an uploaded JSONL file")
def create(body: dict):
    key = g.api_key
    stored = services().files.get(body["input_file_id"], key.project)
    if stored is None:
        raise APIError(400, f"No such file: {body['input_file_id']}", code="file_not_found",
                       param="input_file_id")
    if stored.purpose != "batch":
        raise APIError(400, "The input file's purpose must be 'batch'.", code="invalid_value",
                       param="input_file_id")
    batch = services().lifecycle.create_batch(
        key.name, stored.id, body["endpoint"], body["completion_window"], body.get("metadata"),
        body["priority"], sorted(key.models) if key.models is not None else None, key.project,
        daily_budgets(key.budgets),
    )
    return batch_object(batch)


@bp.get("/v1/batches/<batch_id>")
@require_scope("batch", "monitor")
@documented("A batch")
def retrieve(batch_id: str):
    return batch_object(owned_job(batch_id, "batch"))


@bp.get("/v1/batches")
@require_scope("batch", "monitor")
@accepts(query=PageQuery(), summary="List this project's batches, newest first")
def list_batches(args: dict):
    try:
        jobs, has_more = services().jobs.list(
            "batch", g.api_key.project, args.get("after"), args["limit"])
    except UnknownCursor:
        raise unknown_cursor() from None
    return page([batch_object(job) for job in jobs], has_more)


@bp.post("/v1/batches/<batch_id>/cancel")
@require_scope("batch")
@documented("Cancel a batch (409 once it has finished)")
def cancel(batch_id: str):
    cancellable(owned_job(batch_id, "batch"), "batch")
    return batch_object(services().lifecycle.cancel(batch_id))
