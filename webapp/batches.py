"""The OpenAI Batches API (`/v1/batches`, scope `batch`), so the official SDK works unchanged.

A batch is visible to the key that made it, and to `monitor` keys. Besides OpenAI's fields, a
create call may give `priority` (0-9, larger runs sooner; default 0), in the body or in
`metadata.priority`.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, request

from tasks.batch import enqueue_validate
from tasks.batch_service import ENDPOINTS, WINDOWS, batch_object
from webapp.auth import require_scope
from webapp.errors import APIError
from webapp.paging import page, page_args
from webapp.schemas import parse_json_object

bp = Blueprint("batches", __name__)


def parse_priority(value) -> int:
    if value is None:
        return 0
    try:
        priority = int(value)
    except (TypeError, ValueError):
        priority = -1
    if isinstance(value, bool) or not 0 <= priority <= 9 or str(priority) != str(value).strip():
        raise APIError(400, "'priority' must be an integer from 0 to 9.", code="invalid_value",
                       param="priority")
    return priority


def owned_job(job_id: str, kind: str) -> dict:
    """The job if this key may see it (its own, or any with `monitor`); else 404."""
    job = current_app.extensions["jobs"].get(job_id)
    key = g.api_key
    if job is None or job["kind"] != kind or (job["owner"] != key.name
                                               and "monitor" not in key.scopes):
        raise APIError(404, f"No such {kind}: {job_id}", code=f"{kind}_not_found")
    return job


@bp.post("/v1/batches")
@require_scope("batch")
def create():
    body = parse_json_object(request.get_data(cache=False))
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise APIError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}.",
                       code="invalid_value", param="endpoint")
    window = body.get("completion_window")
    if window not in WINDOWS:
        raise APIError(400, f"'completion_window' must be one of {', '.join(WINDOWS)}.",
                       code="invalid_value", param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise APIError(400, "'metadata' must be an object of at most 16 string values.",
                       code="invalid_value", param="metadata")
    priority = parse_priority(body.get("priority", (metadata or {}).get("priority")))
    file_id = body.get("input_file_id")
    stored = current_app.extensions["files"].get(file_id) if isinstance(file_id, str) else None
    if stored is None:
        raise APIError(400, f"No such file: {file_id}", code="file_not_found",
                       param="input_file_id")
    if stored.purpose != "batch":
        raise APIError(400, "The input file's purpose must be 'batch'.", code="invalid_value",
                       param="input_file_id")
    key = g.api_key
    batch = current_app.extensions["batches"].create_batch(
        key.name, stored.id, endpoint, window, metadata, priority,
        sorted(key.models) if key.models is not None else None,
    )
    enqueue_validate(batch["id"])
    return batch


@bp.get("/v1/batches/<batch_id>")
@require_scope("batch", "monitor")
def retrieve(batch_id: str):
    return batch_object(owned_job(batch_id, "batch"))


@bp.get("/v1/batches")
@require_scope("batch", "monitor")
def list_batches():
    after, limit = page_args()
    key = g.api_key
    owner = None if "monitor" in key.scopes else key.name
    jobs, has_more = current_app.extensions["jobs"].list("batch", owner, after, limit)
    return page([batch_object(job) for job in jobs], has_more)


@bp.post("/v1/batches/<batch_id>/cancel")
@require_scope("batch")
def cancel(batch_id: str):
    owned_job(batch_id, "batch")
    return batch_object(current_app.extensions["batches"].cancel(batch_id))
