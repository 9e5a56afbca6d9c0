"""Bad input through the real stack: a clear 4xx in the OpenAI shape, never a 5xx.

Deep nesting and oversized bodies (chunked too) on every JSON route, wrong types in the fields
the review found, and a property-based fuzz (hypothesis) of every JSON route of the OpenAPI
document: random JSON of every type in every field, bounded in count, and zero 5xx.
"""

from __future__ import annotations

import io
import json
import string

import openai
import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TOKENS, raw_post, sdk, warm
from tests.harness import wait_for

ADMIN = TOKENS["all"]
# 5xx answers that are part of the contract, not failures: a model starting, waking or failed.
HONEST_5XX = {"model_starting", "model_waking", "model_failed"}


def _json_routes(stack) -> list[tuple[str, str]]:
    doc = urllib3.request("GET", f"{stack.base_url}/openapi.json").json()
    return [(method.upper(), path) for path, operations in doc["paths"].items()
            for method, operation in operations.items()
            if "application/json" in operation.get("requestBody", {}).get("content", {})]


def _path(template: str, ids: dict | None = None) -> str:
    for name in ("eval_id", "run_id", "batch_id", "job_id", "file_id", "item_id", "model",
                 "model_id"):
        value = (ids or {}).get(name) or ("sim/fast" if "model" in name else "x1")
        template = template.replace("{" + name + "}", value)
    return template


def _send(stack, method: str, path: str, data: bytes, headers: dict | None = None):
    return urllib3.request(method, f"{stack.base_url}{path}", body=data, retries=False,
                           timeout=30, headers={"Authorization": f"Bearer {ADMIN}",
                                                "Content-Type": "application/json",
                                                **(headers or {})})


def assert_openai_error(response, status: int | None = None) -> dict:
    if status is not None:
        assert response.status == status, (response.status, response.data[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    error = json.loads(response.data)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "authentication_error",
                             "permission_error", "rate_limit_error", "server_error",
                             "not_found_error")
    assert error["code"] is None or isinstance(error["code"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    return error


def assert_anthropic_error(response, status: int | None = None) -> dict:
    """Anthropic's error shape, which the Messages routes answer (its SDK reads that one)."""
    if status is not None:
        assert response.status == status, (response.status, response.data[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    answer = json.loads(response.data)
    assert answer["type"] == "error", answer
    error = answer["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "authentication_error",
                             "permission_error", "not_found_error", "request_too_large",
                             "rate_limit_error", "api_error", "overloaded_error"), error
    return error


def assert_route_error(path: str, response, status: int | None = None) -> dict:
    """The error in the shape of the route: Anthropic's on /v1/messages, else OpenAI's; the
    returned dict has a `code` either way (Anthropic's `type` stands for it)."""
    if path.startswith("/v1/messages"):
        error = assert_anthropic_error(response, status)
        return {**error, "code": error["type"]}
    return assert_openai_error(response, status)


def test_every_json_route_refuses_deep_nesting_with_a_400_naming_the_limit(stack):
    routes = _json_routes(stack)
    assert len(routes) >= 7, routes
    deep = b'{"model": "sim/fast", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    moderate = b'{"model": "sim/fast", "x": ' + b"[" * 65 + b"]" * 65 + b"}"
    for method, template in routes:
        for body in (deep, moderate):
            response = _send(stack, method, _path(template), body)
            error = assert_route_error(template, response, 400)
            assert "64 levels" in error["message"], (template, error)
            assert error["code"] in ("json_too_deep", "invalid_request_error"), error


def test_chunked_body_over_the_limit_is_413_naming_it(stack):
    limit = 256 * 1024  # MAX_REQUEST_BYTES of the test stack

    def chunks():
        yield b'{"model": "sim/fast", "prompt": "'
        for _ in range(40):
            yield b"a" * 8192
        yield b'"}'

    pool = urllib3.PoolManager()
    for path in ("/v1/completions", "/v1/batches", "/v1/evals", "/v1/embeddings",
                 "/v1/responses", "/v1/messages", "/tokenize"):
        response = pool.urlopen(
            "POST", f"{stack.base_url}{path}", body=chunks(), chunked=True, retries=False,
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
        error = assert_route_error(path, response, 413)
        assert str(limit) in error["message"], error
    # A chunked body within the limit is read whole.
    small = pool.urlopen(
        "POST", f"{stack.base_url}/v1/batches", chunked=True, retries=False,
        body=iter([b'{"input_file_id": "nope", ', b'"endpoint": "/v1/completions", ',
                   b'"completion_window": "24h"}']),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    assert assert_openai_error(small, 400)["code"] == "file_not_found"


def test_a_file_over_the_file_limit_is_413_naming_that_limit(stack):
    limit = 16 * 1024 * 1024  # BATCH_MAX_FILE_BYTES of the test stack
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(stack, TOKENS["upload"], timeout=120).files.create(
            file=("big.jsonl", io.BytesIO(b"x" * (limit + 1))), purpose="batch")
    assert refused.value.status_code == 413
    assert str(limit) in refused.value.body["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"completion_window": {}}, "completion_window"),
    ({"completion_window": "1h"}, "completion_window"),
    ({"input_file_id": {}}, "input_file_id"),
    ({"input_file_id": 7}, "input_file_id"),
    ({"endpoint": ["/v1/completions"]}, "endpoint"),
    ({"priority": "5"}, "priority"),
    ({"priority": True}, "priority"),
    ({"priority": 10}, "priority"),
    ({"metadata": {"priority": "high"}}, "metadata.priority"),
    ({"metadata": ["a"]}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata.k.value"),
])
def test_batch_creation_checks_every_field_type(stack, body, param):
    good = {"input_file_id": "file-none", "endpoint": "/v1/completions",
            "completion_window": "24h"}
    response = raw_post(stack, "/v1/batches", {**good, **body}, token="batch")
    error = assert_openai_error(response, 400)
    assert error["param"] == param and error["code"] == "invalid_value", error


def test_batch_completion_priority_must_be_an_integer(stack):
    response = raw_post(stack, "/v1/batch/completions",
                        {"model": "sim/fast", "prompt": "x", "priority": "5"}, token="batch")
    assert assert_openai_error(response, 400)["param"] == "priority"


@pytest.mark.parametrize("path", ["/v1/files?after=bogus", "/v1/batches?after=bogus",
                                  "/v1/evals?after=bogus", "/v1/files?limit=abc",
                                  "/v1/batches?limit=0", "/v1/evals?order=sideways",
                                  "/v1/files?purpose=nonsense"])
def test_bad_list_arguments_are_400(stack, path):
    response = urllib3.request("GET", f"{stack.base_url}{path}", retries=False,
                               headers={"Authorization": f"Bearer {ADMIN}"})
    assert_openai_error(response, 400)


def test_cancelling_a_finished_batch_or_completion_is_409(stack):
    warm(stack, "sim/fast")
    job = raw_post(stack, "/v1/batch/completions",
                   {"model": "sim/fast", "prompt": "x", "max_tokens": 1}, token="batch").json()
    wait_for(lambda: _send(stack, "GET", job["status_url"], b"").json()["status"]
             == "succeeded", 60, interval=0.2, what="the completion")
    cancelled = raw_post(stack, f"{job['status_url']}/cancel", {}, token="batch")
    assert assert_openai_error(cancelled, 409)["code"] == "not_cancellable"
    client = sdk(stack, TOKENS["batch"])
    data = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "sim/fast", "prompt": "x", "max_tokens": 1}}).encode()
    file = sdk(stack, TOKENS["upload"]).files.create(file=("a.jsonl", io.BytesIO(data)),
                                                     purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "completed", 60,
             interval=0.2, what="the batch")
    with pytest.raises(openai.ConflictError) as refused:
        client.batches.cancel(batch.id)
    assert refused.value.body["code"] == "not_cancellable"
    assert client.batches.retrieve(batch.id).status == "completed"


def test_models_retrieve_with_slashes_in_the_id(stack):
    client = sdk(stack, TOKENS["realtime"])
    model = client.models.retrieve("sim/fast")
    assert model.id == "sim/fast" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no/such/model")
    # The allowlist hides what a key may not use.
    with pytest.raises(openai.NotFoundError):
        sdk(stack, TOKENS["allowlist"]).models.retrieve("sim/limits")


# -- the property-based fuzz of every JSON route ---------------------------------------------

_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(alphabet=string.printable + "\u00e9\u4e2d\x00", max_size=12))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# Field names every JSON route knows, so that values of every type reach the checks of real
# fields (and a known model reaches the engine), besides keys nobody knows.
_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream",
           "stream_options", "n", "temperature", "top_p", "priority", "input_file_id",
           "endpoint", "completion_window", "metadata", "name", "data_source",
           "data_source_config", "testing_criteria", "response_format", "stop", "logprobs",
           "input", "instructions", "max_output_tokens", "store", "system", "tokens", "query",
           "documents", "text_1", "text_2", "encoding_format", "dimensions")


def _valid_bodies(file_id: str) -> dict[str, dict]:
    """A body each JSON route accepts, by path template: the fuzz changes a few of its fields,
    so that wrong values reach every check (and the engine), not only the first one."""
    chat = {"model": "sim/fast", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    return {
        "/v1/embeddings": {"model": "sim/embed", "input": ["hi", "there"]},
        "/v1/responses": {"model": "sim/fast", "input": "hi", "max_output_tokens": 16},
        "/v1/messages": chat,
        "/v1/messages/count_tokens": {"model": "sim/fast",
                                      "messages": [{"role": "user", "content": "hi"}]},
        "/tokenize": {"model": "sim/fast", "prompt": "hi there"},
        "/detokenize": {"model": "sim/fast", "tokens": [1, 2, 3]},
        "/v1/rerank": {"model": "sim/embed", "query": "q", "documents": ["a", "b"]},
        "/v1/score": {"model": "sim/embed", "text_1": "a", "text_2": ["b", "c"]},
        "/v1/completions": {"model": "sim/fast", "prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": chat,
        "/v1/batch/completions": {**chat, "priority": 1},
        "/v1/batches": {"input_file_id": file_id, "endpoint": "/v1/completions",
                        "completion_window": "24h"},
        "/v1/evals": {"name": "fuzz", "data_source_config": {
            "type": "custom", "item_schema": {"type": "object"}, "include_sample_schema": True},
            "testing_criteria": [{"type": "string_check", "name": "c", "operation": "eq",
                                  "input": "{{sample.output_text}}", "reference": "x"}]},
        "/v1/evals/{eval_id}": {"name": "renamed"},
        "/v1/evals/{eval_id}/runs": {"data_source": {
            "type": "jsonl", "source": {"type": "file_content", "content": [
                {"item": {}, "sample": {"output_text": "x"}}]}}},
    }


def _bodies(valid: dict):
    changed = st.builds(lambda base, changes, dropped: {
        **{k: v for k, v in base.items() if k not in dropped}, **changes},
        st.just(valid),
        st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=2),
        st.sets(st.sampled_from(sorted(valid)), max_size=1))
    known = st.fixed_dictionaries({}, optional={
        field: (st.sampled_from(["sim/fast", "sim/embed", "no/such"]) | _VALUES)
        if field == "model"
        else _VALUES for field in _FIELDS})
    return st.one_of(st.just(valid), changed, changed, known, _VALUES)


def test_fuzz_every_json_route_finds_no_server_error(stack):
    warm(stack, "sim/fast")
    warm(stack, "sim/embed", embedding=True)
    routes = _json_routes(stack)
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "sim/fast", "prompt": "x", "max_tokens": 1}}).encode()
    file_id = sdk(stack, TOKENS["upload"]).files.create(
        file=("a.jsonl", io.BytesIO(line)), purpose="batch").id
    valid = _valid_bodies(file_id)
    ids = {"eval_id": _send(stack, "POST", "/v1/evals",
                            json.dumps(valid["/v1/evals"]).encode()).json()["id"]}
    assert set(valid) == {t for _, t in routes}, "a JSON route has no valid body to fuzz from"
    seen: dict[str, set[int]] = {}

    @settings(max_examples=30 * len(routes), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        method, template = data.draw(st.sampled_from(routes))
        body = data.draw(_bodies(valid[template]))
        response = _send(stack, method, _path(template, ids), json.dumps(body).encode())
        seen.setdefault(template, set()).add(response.status)
        if response.status >= 400:
            error = assert_route_error(template, response)
            if response.status >= 500:
                assert error["code"] in HONEST_5XX | {"overloaded_error"}, (
                    template, body, response.data)

    check()
    # The fuzz reached every route, and got past the checks on each (not only 400s).
    assert set(seen) == {t for _, t in routes}
    assert all(any(status < 300 for status in statuses) for statuses in seen.values()), seen
