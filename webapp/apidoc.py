"""Request checking and the OpenAPI document, from one set of marshmallow schemas.

A view declares what it takes with `@accepts(body=..., query=..., form=...)`: the decorator
loads the JSON body (size- and depth-limited, `webapp.jsonbody`), the query string or the form
through those schemas before the view runs (a 400 in the OpenAI shape naming the first bad
field), hands the loaded values in as `body=` / `args=` / `form=`, and records the schemas on the
view. `build_openapi(app)` then walks the URL map and writes every route with the schemas its
view recorded, its path parameters and the scopes `require_scope` asked for, so the document is
made from the code that checks the requests and cannot drift from it.

Why apispec with this small decorator rather than flask-smorest: smorest parses bodies with
webargs through Flask's `get_json` (no depth limit, and a chunked body cut silently), answers
422 in its own shape where the OpenAI clients expect a 400 in theirs, and its `@response`
re-serialises answers, where the realtime routes must relay the engine's bytes untouched. What
it would give us beyond that is the document, which apispec's MarshmallowPlugin writes from the
same schemas.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from webapp.errors import APIError
from webapp.jsonbody import json_body

_PATH_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")
_ERROR_STATUSES = {
    "400": "Bad request: the message names the field (`param`).",
    "401": "Missing or unknown API key.",
    "403": "The key lacks the scope or the model.",
    "404": "No such object (or it belongs to another project).",
    "413": "Request body larger than the limit.",
    "429": "Over the key's rate or concurrency limit (`Retry-After`).",
}


class ErrorDetail(Schema):
    message = fields.String(required=True)
    type = fields.String(required=True)
    code = fields.String(allow_none=True)
    param = fields.String(allow_none=True)


class ErrorResponse(Schema):
    error = fields.Nested(ErrorDetail, required=True)


class AnthropicErrorDetail(Schema):
    type = fields.String(required=True)
    message = fields.String(required=True)


class AnthropicErrorResponse(Schema):
    """Anthropic's error shape, which `/v1/messages` answers (webapp.errors)."""

    type = fields.String(required=True, validate=validate.Equal("error"))
    error = fields.Nested(AnthropicErrorDetail, required=True)


def first_error(messages) -> tuple[str, str]:
    """(dotted field path, message) of the first error in marshmallow's nested messages."""
    path: list[str] = []
    while True:
        if isinstance(messages, dict) and messages:
            key = sorted(messages, key=str)[0]
            if key != "_schema":
                path.append(str(key))
            messages = messages[key]
        elif isinstance(messages, list) and messages and not isinstance(messages[0], str):
            messages = messages[0]
        else:
            message = messages[0] if isinstance(messages, list) and messages else messages
            return ".".join(path) or "body", str(message)


def load(schema: Schema, data, where: str = "body"):
    """`data` loaded through `schema`; a 400 naming the first bad field otherwise."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        field, message = first_error(exc.messages)
        if field == "body" and where != "body":
            field = where
        raise APIError(400, f"'{field}': {message}", code="invalid_value",
                       param=field) from None


def _query_dict(schema: Schema) -> dict:
    """The query string as a plain dict: the first value of each argument the schema knows
    (a list for a List field)."""
    args = {}
    for name, field in schema.fields.items():
        key = field.data_key or name
        if key in request.args:
            args[key] = (request.args.getlist(key) if isinstance(field, fields.List)
                         else request.args[key])
    return args


def accepts(body: Schema | None = None, *, query: Schema | None = None,
            form: Schema | None = None, raw_body: Schema | None = None,
            summary: str | None = None, responses: dict | None = None,
            error_schema: str = "ErrorResponse") -> Callable:
    """Check a view's input with these schemas and record them for the OpenAPI document.

    `raw_body` documents a body the view reads itself (the realtime pass-through);
    `error_schema` names the shape of the route's errors (Anthropic's on /v1/messages)."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args, **kwargs):
            if query is not None:
                kwargs["args"] = load(query, _query_dict(query), "query")
            if form is not None:
                kwargs["form"] = load(form, request.form.to_dict(), "form")
            if body is not None:
                kwargs["body"] = load(body, json_body())
            return view(*args, **kwargs)

        checked.openapi = {"body": body or raw_body, "query": query, "form": form,
                           "summary": summary, "responses": responses or {},
                           "error_schema": error_schema}
        return checked

    return decorator


def documented(summary: str | None = None, responses: dict | None = None,
               content_type: str = "application/json") -> Callable:
    """Record a view that takes no input besides its path (and its query-less GET)."""

    def decorator(view: Callable) -> Callable:
        view.openapi = {"summary": summary, "responses": responses or {},
                        "content_type": content_type}
        return view

    return decorator


class PageQuery(Schema):
    """OpenAI-style paging of a list."""

    class Meta:
        unknown = EXCLUDE

    after = fields.String(metadata={"description": "id of the last item of the previous page"})
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


def _operation(rule, view, methods) -> dict:
    meta = getattr(view, "openapi", {})
    scopes = getattr(view, "required_scopes", None)
    operation: dict = {"operationId": rule.endpoint.replace(".", "_"),
                       "tags": [rule.endpoint.split(".")[0]]}
    if meta.get("summary") or view.__doc__:
        operation["summary"] = meta.get("summary") or view.__doc__.strip().splitlines()[0]
    parameters = [
        {"in": "path", "name": name, "required": True,
         "schema": {"type": "string", "pattern": "^[^/]+(/[^/]+)*$" if conv == "path"
                    else "^[^/]+$"}}
        for conv, name in _PATH_PARAM.findall(rule.rule)
    ]
    if meta.get("query") is not None:
        parameters.append({"in": "query", "schema": meta["query"]})
    if parameters:
        operation["parameters"] = parameters
    if meta.get("body") is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": meta["body"]}}}
    if meta.get("form") is not None:
        operation["requestBody"] = {"required": True, "content": {
            "multipart/form-data": {"schema": meta["form"]}}}
    ok = {"description": "Success.",
          "content": {meta.get("content_type", "application/json"): {"schema": {}}}}
    responses = {"200": ok}
    for status, description in meta.get("responses", {}).items():
        responses[str(status)] = {"description": description}
    errors = dict(_ERROR_STATUSES)
    if scopes is None:
        errors = {k: v for k, v in errors.items() if k not in ("401", "403", "429")}
    else:
        operation["security"] = [{"bearerAuth": []}]
        if getattr(view, "accepts_x_api_key", False):
            operation["security"].append({"apiKeyHeader": []})
        operation["x-required-scopes"] = list(scopes)
        operation["description"] = "Scope: " + " or ".join(f"`{s}`" for s in scopes) + "."
    error_schema = meta.get("error_schema", "ErrorResponse")
    for status, description in errors.items():
        responses.setdefault(status, {"description": description,
                                      "content": {"application/json":
                                                  {"schema": error_schema}}})
    operation["responses"] = responses
    return operation


def build_openapi(app: Flask) -> dict:
    """The OpenAPI 3 document of every route of `app` (static files aside)."""
    spec = APISpec(title="LLM Gateway Orchestrator", version="1",
                   openapi_version="3.0.3", plugins=[MarshmallowPlugin()],
                   info={"description": "One OpenAI-compatible endpoint in front of "
                                        "self-hosted inference engines."})
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("apiKeyHeader",
                                    {"type": "apiKey", "in": "header", "name": "x-api-key"})
    spec.components.schema("ErrorResponse", schema=ErrorResponse)
    spec.components.schema("AnthropicErrorResponse", schema=AnthropicErrorResponse)
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        path = _PATH_PARAM.sub(lambda m: "{" + m.group(2) + "}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(rule, view, method)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()
