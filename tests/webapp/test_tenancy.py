"""Projects cannot see each other: every route by two projects by each scope, through the stack.

Project `default` makes one of everything (a file, a finished batch with its output and error
files, a batch completion, an eval with a finished run and its output items). Then every route
of the OpenAPI document that names one of those objects is called by a key of each scope of
project `other`: a scope the route takes gets 404 (never 403, never the object), any other scope
403, and nothing is changed. Lists seen from `other` hold none of `default`'s objects. The
official SDK makes the calls it has.
"""

from __future__ import annotations

import io
import json

import openai
import pytest
import urllib3

from tests.conftest import OTHER_TOKENS, TOKENS, sdk, warm
from tests.harness import wait_for

ID_PARAMS = ("file_id", "batch_id", "job_id", "eval_id", "run_id", "item_id", "response_id")


def _request(stack, method: str, path: str, token: str, body: dict | None = None):
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if method in ("POST", "PUT", "PATCH"):
        headers["Content-Type"] = "application/json"
        data = json.dumps(body or {}).encode()
    return urllib3.request(method, f"{stack.base_url}{path}", body=data, headers=headers,
                           retries=False, timeout=30)


@pytest.fixture(scope="module")
def world(stack):
    """One of each object in project `default`, finished."""
    warm(stack, "sim/fast")
    uploader, batcher, evaluator = (sdk(stack, TOKENS[s]) for s in ("upload", "batch", "eval"))
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "sim/fast", "prompt": f"p{i}", "max_tokens": 2}}
             for i in range(3)]
    # One line the engine refuses, so the batch has an error file too.
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "sim/fast", "prompt": "x", "max_tokens": 999_999}})
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file = uploader.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = batcher.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                   completion_window="24h")
    batch = wait_for(lambda: (b := batcher.batches.retrieve(batch.id)).status == "completed"
                     and b, 60, interval=0.2, what="the batch")
    completion = _request(stack, "POST", "/v1/batch/completions", TOKENS["batch"],
                          {"model": "sim/fast", "prompt": "secret prompt", "max_tokens": 2})
    job = completion.json()
    wait_for(lambda: _request(stack, "GET", job["status_url"], TOKENS["batch"]).json()["status"]
             == "succeeded", 60, interval=0.2, what="the batch completion")
    created = evaluator.evals.create(
        name="tenancy",
        data_source_config={"type": "custom", "item_schema": {
            "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            "include_sample_schema": True},
        testing_criteria=[{"type": "string_check", "name": "nonempty", "operation": "ne",
                           "input": "{{sample.output_text}}", "reference": ""}])
    run = evaluator.evals.runs.create(created.id, data_source={
        "type": "completions", "model": "sim/fast",
        "input_messages": {"type": "template",
                           "template": [{"role": "user", "content": "{{item.q}}"}]},
        "sampling_params": {"max_completion_tokens": 2},
        "source": {"type": "file_content", "content": [{"item": {"q": "hello"}}]}})
    wait_for(lambda: evaluator.evals.runs.retrieve(run.id, eval_id=created.id).status
             == "completed", 60, interval=0.2, what="the eval run")
    item = evaluator.evals.runs.output_items.list(run.id, eval_id=created.id).data[0]
    assert batch.output_file_id and batch.error_file_id
    # A stored response (kept by the engine that made it; the gateway notes whose it is).
    response = sdk(stack, TOKENS["realtime"]).responses.create(
        model="sim/fast", input="secret question", max_output_tokens=4)
    return {"file_id": file.id, "batch_id": batch.id, "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id, "job_id": job["id"], "eval_id": created.id,
            "run_id": run.id, "item_id": item.id, "response_id": response.id}


def _routes(stack) -> list[tuple[str, str, tuple[str, ...]]]:
    """(method, path template, scopes) of every documented route that names a tenant's object."""
    doc = urllib3.request("GET", f"{stack.base_url}/openapi.json").json()
    routes = []
    for path, operations in doc["paths"].items():
        if any("{" + name + "}" in path for name in ID_PARAMS):
            for method, operation in operations.items():
                routes.append((method.upper(), path, tuple(operation["x-required-scopes"])))
    return routes


def _fill(path: str, world: dict, file_key: str = "file_id") -> str:
    values = {**world, "file_id": world[file_key]}
    for name in ID_PARAMS:
        path = path.replace("{" + name + "}", values[name])
    return path


def test_the_matrix_covers_every_object_route(stack):
    routes = {(m, p) for m, p, _ in _routes(stack)}
    expected = {("GET", "/v1/files/{file_id}"), ("GET", "/v1/files/{file_id}/content"),
                ("DELETE", "/v1/files/{file_id}"), ("GET", "/v1/batches/{batch_id}"),
                ("POST", "/v1/batches/{batch_id}/cancel"),
                ("GET", "/v1/batch/completions/{job_id}"),
                ("POST", "/v1/batch/completions/{job_id}/cancel"),
                ("GET", "/v1/evals/{eval_id}"), ("POST", "/v1/evals/{eval_id}"),
                ("DELETE", "/v1/evals/{eval_id}"), ("GET", "/v1/evals/{eval_id}/runs"),
                ("POST", "/v1/evals/{eval_id}/runs"),
                ("GET", "/v1/evals/{eval_id}/runs/{run_id}"),
                ("DELETE", "/v1/evals/{eval_id}/runs/{run_id}"),
                ("POST", "/v1/evals/{eval_id}/runs/{run_id}/cancel"),
                ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items"),
                ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items/{item_id}"),
                ("GET", "/v1/responses/{response_id}"),
                ("POST", "/v1/responses/{response_id}/cancel")}
    assert expected <= routes, expected - routes


@pytest.mark.parametrize("file_key", ["file_id", "output_file_id", "error_file_id"])
@pytest.mark.parametrize("scope", sorted(OTHER_TOKENS))
def test_another_project_gets_404_or_403_on_every_object_route(stack, world, scope, file_key):
    for method, template, scopes in _routes(stack):
        if file_key != "file_id" and "{file_id}" not in template:
            continue
        path = _fill(template, world, file_key)
        answer = _request(stack, method, path, OTHER_TOKENS[scope],
                          {"name": "taken over", "data_source": {}})
        expected = 404 if scope in scopes else 403
        assert answer.status == expected, (method, path, scope, answer.status, answer.data)
        code = answer.json()["error"]["code"]
        assert code == "insufficient_scope" if expected == 403 else code.endswith("not_found")
        # Nothing of the object leaks into the answer.
        for value in world.values():
            assert value.encode() not in answer.data or value in path


def test_the_owning_project_still_has_everything(stack, world):
    """After every refused call above (deletes and cancels included), nothing changed."""
    client = sdk(stack, TOKENS["batch"])
    batch = client.batches.retrieve(world["batch_id"])
    assert batch.status == "completed"
    for file_id in (world["file_id"], world["output_file_id"], world["error_file_id"]):
        assert client.files.retrieve(file_id).id == file_id
        assert client.files.content(file_id).read()
    evaluator = sdk(stack, TOKENS["eval"])
    assert evaluator.evals.retrieve(world["eval_id"]).name == "tenancy"
    assert evaluator.evals.runs.retrieve(world["run_id"], eval_id=world["eval_id"]).status \
        == "completed"
    job = _request(stack, "GET", f"/v1/batch/completions/{world['job_id']}", TOKENS["batch2"])
    assert job.status == 200 and job.json()["result"]["choices"]  # same project, another key
    stored = sdk(stack, TOKENS["all"]).responses.retrieve(world["response_id"])
    assert stored.id == world["response_id"] and stored.status in ("completed", "incomplete")


@pytest.mark.parametrize("scope", ["upload", "batch", "eval"])
def test_the_sdk_of_another_project_sees_not_found(stack, world, scope):
    client = sdk(stack, OTHER_TOKENS[scope])
    for file_id in (world["file_id"], world["output_file_id"], world["error_file_id"]):
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(file_id)
        with pytest.raises(openai.NotFoundError):
            client.files.content(file_id)
        assert file_id not in {f.id for f in client.files.list()}
    if scope == "upload":
        with pytest.raises(openai.NotFoundError):
            client.files.delete(world["file_id"])
    if scope == "batch":
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(world["batch_id"])
        with pytest.raises(openai.NotFoundError):
            client.batches.cancel(world["batch_id"])
        assert world["batch_id"] not in {b.id for b in client.batches.list()}
        # Another project's file cannot be run either.
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=world["file_id"], endpoint="/v1/completions",
                                  completion_window="24h")
        assert refused.value.body["code"] == "file_not_found"
    if scope == "eval":
        with pytest.raises(openai.NotFoundError):
            client.evals.retrieve(world["eval_id"])
        with pytest.raises(openai.NotFoundError):
            client.evals.runs.retrieve(world["run_id"], eval_id=world["eval_id"])
        assert world["eval_id"] not in {e.id for e in client.evals.list()}


def test_monitor_of_another_project_sees_status_and_counts_but_no_contents(stack, world):
    monitor = OTHER_TOKENS["monitor"]
    overview = _request(stack, "GET", "/ui/api/overview", monitor)
    assert overview.status == 200
    jobs = overview.json()["jobs"]
    rows = {row["id"]: row for part in ("batches", "completions", "eval_runs")
            for row in jobs[part]}
    assert rows[world["batch_id"]]["status"] == "completed"
    assert rows[world["batch_id"]]["total"] == 4 and rows[world["batch_id"]]["project"] \
        == "default"
    assert rows[world["job_id"]]["status"] == "succeeded"
    assert b"secret prompt" not in overview.data and b"prompt" not in overview.data
    metrics = _request(stack, "GET", "/metrics", monitor)
    assert metrics.status == 200 and b"gateway_open_jobs" in metrics.data
    # The API itself stays per project, for monitor keys too.
    listed = _request(stack, "GET", "/v1/batches", monitor)
    assert listed.status == 200 and world["batch_id"].encode() not in listed.data


def test_a_project_lists_what_its_keys_made(stack, world):
    batches = sdk(stack, TOKENS["monitor"]).batches.list()
    assert world["batch_id"] in {b.id for b in batches}
    files = {f.id for f in sdk(stack, TOKENS["eval"]).files.list()}
    assert {world["file_id"], world["output_file_id"], world["error_file_id"]} <= files
