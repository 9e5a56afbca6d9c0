"""The original README's batch endpoint: `/v1/batch/completions` (scope `batch`).

One completion (a completions body, or a chat body with `messages`) plus `priority` (0-9, larger
runs sooner, default 0), run by the batch workers in priority order when GPU time allows.
`POST` answers 202 with the job's `status_url`; `GET` that URL for the status and, once done,
the engine's completion object; `POST .../cancel` cancels it if it has not finished. A job
belongs to the project of the key that made it (404 to any other).
"""

from __future__ import annotations

from flask import Blueprint, g, url_for

from jobs.budget_windows import daily_budgets
from webapp.apidoc import accepts, documented
from webapp.arguments import BatchCompletionCreate
from webapp.auth import check_model_allowed, require_scope
from webapp.batches import cancellable, owned_job
from webapp.context import services
from webapp.errors import APIError

bp = Blueprint("batch", __name__)


def job_view(job: dict) -> dict:
    return {
        "id": job["id"],
        "object": "batch.completion",
        "status": job["status"],
        "model": job.get("model"),
        "endpoint": job["endpoint"],
        "priority": job.get("priority") or 0,
        "created_at": job["created_at"],
        "started_at": job.get("started_at"),
        "finished_at": job.get("finished_at"),
        "status_url": url_for("batch.status", job_id=job["id"]),
        "result": job.get("response") if job["status"] == "succeeded" else None,
        "error": job.get("error"),
        "waiting_reason": job.get("waiting_reason"),  # its owner's daily budget is used up
    }


@bp.post("/v1/batch/completions")
@require_scope("batch")
@accepts(BatchCompletionCreate(), summary="Queue one completion (or chat) with a priority",
         responses={202: "Queued: the job, with its status_url."})
def submit(body: dict):
    priority = body.pop("priority")
    model = body["model"]
    if model not in services().catalog:
        raise APIError(404, f"The model '{model}' does not exist.", code="model_not_found",
                       param="model")
    check_model_allowed(g.api_key, model)
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    job = services().lifecycle.create_completion(
        g.api_key.name, endpoint, body, priority, g.api_key.project,
        daily_budgets(g.api_key.budgets),
    )
    return job_view(job), 202, {"Location": url_for("batch.status", job_id=job["id"])}


@bp.get("/v1/batch/completions/<job_id>")
@require_scope("batch", "monitor")
@documented("A batch completion's status and, once done, its result")
def status(job_id: str):
    return job_view(owned_job(job_id, "completion"))


@bp.post("/v1/batch/completions/<job_id>/cancel")
@require_scope("batch")
@documented("Cancel a batch completion (409 once it has finished)")
def cancel(job_id: str):
    cancellable(owned_job(job_id, "completion"), "batch completion")
    return job_view(services().lifecycle.cancel(job_id))
