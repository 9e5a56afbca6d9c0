"""The OpenAI Evals API (`/v1/evals`, scope `eval`), so the official SDK's `client.evals` works.

Evals and their runs belong to the project of the key that made them: keys of that project with
`eval` (or `monitor`, to read) see them, and to another project they do not exist (404). Definitions
are checked when created (`jobs.eval_definitions`), so a bad grader, template, schema or model
is a 400 naming the field; a run is queued at once and runs on the batch workers. Besides
OpenAI's fields, a run may be given `priority` (0-9, in the body or `metadata.priority`), and
`label_model` and `score_model` graders `sampling_params` for their judge; output items may be
filtered by `status` `pass`, `fail` or `error`.
"""

from __future__ import annotations

from flask import Blueprint, g, url_for

from jobs.eval_definitions import DefinitionError, parse_eval, parse_run
from jobs.graders import JUDGE_TYPES
from jobs.tenancy import UnknownCursor
from webapp.apidoc import accepts, documented
from webapp.arguments import EvalCreate, EvalUpdate, OrderedPage, OutputItemList, RunCreate, RunList
from webapp.auth import check_model_allowed, require_scope
from webapp.batches import cancellable
from webapp.context import services
from webapp.errors import APIError
from webapp.paging import page, unknown_cursor
from webapp.serializers import public_eval, run_object

bp = Blueprint("evals", __name__)

READERS = ("eval", "monitor")


def _evals():
    return services().evals


def _definition_error(exc: DefinitionError) -> APIError:
    return APIError(400, exc.message, code="invalid_value", param=exc.param)


def _owned_eval(eval_id: str) -> dict:
    record = _evals().store.get(eval_id, g.api_key.project)
    if record is None:
        raise APIError(404, f"No such eval: {eval_id}", code="eval_not_found", param="eval_id")
    return record


def _owned_run(eval_id: str, run_id: str) -> dict:
    _owned_eval(eval_id)
    job = services().jobs.get(run_id, g.api_key.project)
    if job is None or job.get("kind") != "eval_run" or job.get("eval_id") != eval_id:
        raise APIError(404, f"No such run: {run_id}", code="run_not_found", param="run_id")
    return job


def _run_view(job: dict) -> dict:
    run = run_object(job, services().jobs.tally(job["id"]))
    run["report_url"] = url_for("evals.list_output_items", eval_id=job["eval_id"],
                                run_id=job["id"], _external=True)
    return run


def _check_models(models: list[str]) -> None:
    for model in models:
        check_model_allowed(g.api_key, model)


# -- evals ---------------------------------------------------------------------------------

@bp.post("/v1/evals")
@require_scope("eval")
@accepts(EvalCreate(), summary="Define an eval")
def create_eval(body: dict):
    try:
        parsed = parse_eval(body, services().catalog)
    except DefinitionError as exc:
        raise _definition_error(exc) from None
    _check_models([c["model"] for c in parsed["testing_criteria"]
                   if c["type"] in JUDGE_TYPES])
    return public_eval(_evals().store.create(g.api_key.name, parsed, g.api_key.project))


@bp.get("/v1/evals/<eval_id>")
@require_scope(*READERS)
@documented("An eval")
def retrieve_eval(eval_id: str):
    return public_eval(_owned_eval(eval_id))


@bp.post("/v1/evals/<eval_id>")
@require_scope("eval")
@accepts(EvalUpdate(), summary="Rename an eval or change its metadata")
def update_eval(eval_id: str, body: dict):
    _owned_eval(eval_id)
    return public_eval(_evals().store.update(eval_id, **body))


@bp.get("/v1/evals")
@require_scope(*READERS)
@accepts(query=OrderedPage(), summary="List this project's evals")
def list_evals(args: dict):
    try:
        records, has_more = _evals().store.list(g.api_key.project, args.get("after"),
                                                args["limit"], args["order"])
    except UnknownCursor:
        raise unknown_cursor() from None
    return page([public_eval(r) for r in records], has_more)


@bp.delete("/v1/evals/<eval_id>")
@require_scope("eval")
@documented("Delete an eval and its runs")
def delete_eval(eval_id: str):
    _owned_eval(eval_id)
    _evals().delete_eval(eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# -- runs ----------------------------------------------------------------------------------

@bp.post("/v1/evals/<eval_id>/runs")
@require_scope("eval")
@accepts(RunCreate(), summary="Run an eval")
def create_run(eval_id: str, body: dict):
    definition = _owned_eval(eval_id)
    try:
        parsed = parse_run(body, definition, services().catalog)
    except DefinitionError as exc:
        raise _definition_error(exc) from None
    _check_models(([parsed["model"]] if parsed["model"] else [])
                  + [c["model"] for c in definition["testing_criteria"]
                     if c["type"] in JUDGE_TYPES])
    try:
        job = _evals().create_run(g.api_key.name, definition, parsed, body["priority"],
                                  g.api_key.project)
    except DefinitionError as exc:
        raise _definition_error(exc) from None
    return _run_view(job)


@bp.get("/v1/evals/<eval_id>/runs")
@require_scope(*READERS)
@accepts(query=RunList(), summary="List an eval's runs")
def list_runs(eval_id: str, args: dict):
    _owned_eval(eval_id)
    try:
        jobs, has_more = _evals().list_runs(eval_id, args.get("after"), args["limit"],
                                            args["order"], args.get("status"))
    except UnknownCursor:
        raise unknown_cursor() from None
    return page([_run_view(job) for job in jobs], has_more)


@bp.get("/v1/evals/<eval_id>/runs/<run_id>")
@require_scope(*READERS)
@documented("An eval run")
def retrieve_run(eval_id: str, run_id: str):
    return _run_view(_owned_run(eval_id, run_id))


@bp.post("/v1/evals/<eval_id>/runs/<run_id>/cancel")
@require_scope("eval")
@documented("Cancel an eval run (409 once it has finished)")
def cancel_run(eval_id: str, run_id: str):
    cancellable(_owned_run(eval_id, run_id), "run")
    return _run_view(_evals().cancel_run(run_id))


@bp.delete("/v1/evals/<eval_id>/runs/<run_id>")
@require_scope("eval")
@documented("Delete an eval run")
def delete_run(eval_id: str, run_id: str):
    _owned_run(eval_id, run_id)
    _evals().delete_run(run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


# -- output items --------------------------------------------------------------------------

@bp.get("/v1/evals/<eval_id>/runs/<run_id>/output_items")
@require_scope(*READERS)
@accepts(query=OutputItemList(), summary="A run's graded items")
def list_output_items(eval_id: str, run_id: str, args: dict):
    _owned_run(eval_id, run_id)
    try:
        items, has_more = _evals().output_items(run_id, args.get("status"), args.get("after"),
                                                args["limit"], args["order"])
    except UnknownCursor:
        raise unknown_cursor() from None
    return page(items, has_more)


@bp.get("/v1/evals/<eval_id>/runs/<run_id>/output_items/<item_id>")
@require_scope(*READERS)
@documented("One graded item")
def retrieve_output_item(eval_id: str, run_id: str, item_id: str):
    _owned_run(eval_id, run_id)
    item = _evals().output_item(run_id, item_id)
    if item is None:
        raise APIError(404, f"No such output item: {item_id}", code="output_item_not_found",
                       param="output_item_id")
    return item
