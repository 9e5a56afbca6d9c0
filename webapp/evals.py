"""The OpenAI Evals API (`/v1/evals`, scope `eval`), so the official SDK's `client.evals` works.

Evals and their runs belong to the key that made them (`monitor` keys may read all). Definitions
are checked when created (`tasks.eval_definitions`), so a bad grader, template, schema or model
is a 400 naming the field; a run is queued at once and runs on the batch workers. Besides
OpenAI's fields, a run may be given `priority` (0-9, in the body or `metadata.priority`), and
`label_model` and `score_model` graders `sampling_params` for their judge; output items may be
filtered by `status` `pass`, `fail` or `error`.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, request, url_for

from tasks.eval_definitions import DefinitionError, check_metadata, parse_eval, parse_run
from tasks.eval_service import RUN_STATUSES, run_object
from tasks.eval_store import public_eval
from tasks.graders import JUDGE_TYPES
from webapp.auth import check_model_allowed, require_scope
from webapp.batches import parse_priority
from webapp.errors import APIError
from webapp.paging import page, page_args
from webapp.schemas import parse_json_object

bp = Blueprint("evals", __name__)

READERS = ("eval", "monitor")


def _evals():
    return current_app.extensions["evals"]


def _order() -> str:
    order = request.args.get("order", "asc")
    if order not in ("asc", "desc"):
        raise APIError(400, "'order' must be 'asc' or 'desc'.", code="invalid_value",
                       param="order")
    return order


def _definition_error(exc: DefinitionError) -> APIError:
    return APIError(400, exc.message, code="invalid_value", param=exc.param)


def _body() -> dict:
    return parse_json_object(request.get_data(cache=False))


def _owned_eval(eval_id: str) -> dict:
    record = _evals().store.get(eval_id)
    key = g.api_key
    if record is None or (record["owner"] != key.name and "monitor" not in key.scopes):
        raise APIError(404, f"No such eval: {eval_id}", code="eval_not_found", param="eval_id")
    return record


def _owned_run(eval_id: str, run_id: str) -> dict:
    _owned_eval(eval_id)
    job = current_app.extensions["jobs"].get(run_id)
    if job is None or job.get("kind") != "eval_run" or job.get("eval_id") != eval_id:
        raise APIError(404, f"No such run: {run_id}", code="run_not_found", param="run_id")
    return job


def _run_view(job: dict) -> dict:
    run = run_object(job, current_app.extensions["jobs"].tally(job["id"]))
    run["report_url"] = url_for("evals.list_output_items", eval_id=job["eval_id"],
                                run_id=job["id"], _external=True)
    return run


def _check_models(models: list[str]) -> None:
    for model in models:
        check_model_allowed(g.api_key, model)


# -- evals ---------------------------------------------------------------------------------

@bp.post("/v1/evals")
@require_scope("eval")
def create_eval():
    try:
        parsed = parse_eval(_body(), current_app.extensions["catalog"])
    except DefinitionError as exc:
        raise _definition_error(exc) from None
    _check_models([c["model"] for c in parsed["testing_criteria"]
                   if c["type"] in JUDGE_TYPES])
    return public_eval(_evals().store.create(g.api_key.name, parsed))


@bp.get("/v1/evals/<eval_id>")
@require_scope(*READERS)
def retrieve_eval(eval_id: str):
    return public_eval(_owned_eval(eval_id))


@bp.post("/v1/evals/<eval_id>")
@require_scope("eval")
def update_eval(eval_id: str):
    _owned_eval(eval_id)
    body = _body()
    changes = {}
    if "name" in body:
        if not isinstance(body["name"], str):
            raise APIError(400, "'name' must be a string.", code="invalid_value", param="name")
        changes["name"] = body["name"]
    if "metadata" in body:
        try:
            changes["metadata"] = check_metadata(body["metadata"])
        except DefinitionError as exc:
            raise _definition_error(exc) from None
    return public_eval(_evals().store.update(eval_id, **changes))


@bp.get("/v1/evals")
@require_scope(*READERS)
def list_evals():
    after, limit = page_args()
    key = g.api_key
    owner = None if "monitor" in key.scopes else key.name
    records, has_more = _evals().store.list(owner, after, limit, _order())
    return page([public_eval(r) for r in records], has_more)


@bp.delete("/v1/evals/<eval_id>")
@require_scope("eval")
def delete_eval(eval_id: str):
    _owned_eval(eval_id)
    _evals().delete_eval(eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# -- runs ----------------------------------------------------------------------------------

@bp.post("/v1/evals/<eval_id>/runs")
@require_scope("eval")
def create_run(eval_id: str):
    definition = _owned_eval(eval_id)
    body = _body()
    try:
        parsed = parse_run(body, definition, current_app.extensions["catalog"])
    except DefinitionError as exc:
        raise _definition_error(exc) from None
    priority = parse_priority(body.get("priority", (parsed["metadata"] or {}).get("priority")))
    _check_models(([parsed["model"]] if parsed["model"] else [])
                  + [c["model"] for c in definition["testing_criteria"]
                     if c["type"] in JUDGE_TYPES])
    try:
        job = _evals().create_run(g.api_key.name, definition, parsed, priority)
    except DefinitionError as exc:
        raise _definition_error(exc) from None
    return _run_view(job)


@bp.get("/v1/evals/<eval_id>/runs")
@require_scope(*READERS)
def list_runs(eval_id: str):
    _owned_eval(eval_id)
    after, limit = page_args()
    status = request.args.get("status")
    if status is not None and status not in RUN_STATUSES:
        raise APIError(400, f"'status' must be one of {', '.join(RUN_STATUSES)}.",
                       code="invalid_value", param="status")
    jobs, has_more = _evals().list_runs(eval_id, after, limit, _order(), status)
    return page([_run_view(job) for job in jobs], has_more)


@bp.get("/v1/evals/<eval_id>/runs/<run_id>")
@require_scope(*READERS)
def retrieve_run(eval_id: str, run_id: str):
    return _run_view(_owned_run(eval_id, run_id))


@bp.post("/v1/evals/<eval_id>/runs/<run_id>/cancel")
@require_scope("eval")
def cancel_run(eval_id: str, run_id: str):
    _owned_run(eval_id, run_id)
    return _run_view(_evals().cancel_run(run_id))


@bp.delete("/v1/evals/<eval_id>/runs/<run_id>")
@require_scope("eval")
def delete_run(eval_id: str, run_id: str):
    _owned_run(eval_id, run_id)
    _evals().delete_run(run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


# -- output items --------------------------------------------------------------------------

@bp.get("/v1/evals/<eval_id>/runs/<run_id>/output_items")
@require_scope(*READERS)
def list_output_items(eval_id: str, run_id: str):
    _owned_run(eval_id, run_id)
    after, limit = page_args()
    status = request.args.get("status")
    if status is not None and status not in ("pass", "fail", "error"):
        raise APIError(400, "'status' must be 'pass', 'fail' or 'error'.", code="invalid_value",
                       param="status")
    items, has_more = _evals().output_items(run_id, status, after, limit, _order())
    return page(items, has_more)


@bp.get("/v1/evals/<eval_id>/runs/<run_id>/output_items/<item_id>")
@require_scope(*READERS)
def retrieve_output_item(eval_id: str, run_id: str, item_id: str):
    _owned_run(eval_id, run_id)
    item = _evals().output_item(run_id, item_id)
    if item is None:
        raise APIError(404, f"No such output item: {item_id}", code="output_item_not_found",
                       param="output_item_id")
    return item
