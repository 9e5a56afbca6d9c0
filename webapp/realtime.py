"""The realtime API: `/v1/completions`, `/v1/chat/completions` (plain and streamed), `/v1/models`
and `/v1/models/{id}`.

A call is checked (key, scope, model, body), routed to a ready instance of its model and
forwarded as sent (save for `priority`, which the gateway sets: `runtimes.engine_priority`); a
model with no ready instance goes through `coldstart`. This is the hot path:
no Redis round trip unless the key has limits or the model is cold.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, g, request

from runtimes.catalog import ModelSpec
from runtimes.engine_errors import normalise_engine_error
from runtimes.engine_priority import REALTIME, set_engine_priority
from runtimes.engine_requests import CHAT_COMPLETION, COMPLETION
from runtimes.registry import READY
from runtimes.upstream import EngineBrokeOff, EngineTimeout, EngineUnreachable
from webapp import coldstart
from webapp.apidoc import accepts, documented
from webapp.auth import admit, check_model_allowed, require_scope
from webapp.context import Gateway, gateway, services
from webapp.errors import APIError
from webapp.jsonbody import parse_json_object, read_request_body
from webapp.metrics import StreamTimer
from webapp.relay import engine_failure, read_body, relay_stream
from webapp.schemas import validate_body

bp = Blueprint("realtime", __name__)


def _model_spec(model: str) -> ModelSpec:
    spec = services().catalog.get(model)
    if spec is None:
        raise APIError(
            404, f"The model '{model}' does not exist.", code="model_not_found", param="model"
        )
    return spec


def _forward(schema, path: str):
    gw = gateway()
    raw = read_request_body()
    body = parse_json_object(raw)
    validate_body(schema, body)
    spec = _model_spec(body["model"])
    if set_engine_priority(spec, body, REALTIME):  # most urgent, whatever the caller asked
        raw = json.dumps(body, separators=(",", ":")).encode()
    g.model = spec.id  # the model label of this call's metrics (webapp.metrics)
    key = g.api_key
    check_model_allowed(key, spec.id)
    release_lease = admit(key)
    request_id = g.request_id  # webapp.request_id: the caller's or a new one
    gw.usage.arrived(spec.id)
    try:
        return _send(gw, spec, path, raw, request_id, bool(body.get("stream")), release_lease)
    except BaseException:
        if release_lease is not None:
            release_lease()
        raise


def _open_upstream(gw: Gateway, spec: ModelSpec, path: str, raw: bytes, request_id: str):
    """Send the call to a ready instance; return it and the engine's unread answer.

    The call counts as in flight on the instance from here; the caller ends it.
    """
    router, usage, client = gw.services.router, gw.usage, gw.engine_client
    for attempt in (1, 2):
        record = router.pick(spec.id, usage.inflight) or coldstart.await_runtime(spec)
        usage.begin(record.id, spec.id)
        try:
            return record, client.send(record.host, record.port, path, raw, request_id)
        except (EngineTimeout, EngineBrokeOff) as exc:
            usage.end(record.id)
            raise engine_failure(exc) from None
        except EngineUnreachable:
            usage.end(record.id)
            # The cached route may be stale (the engine was stopped a moment ago): look again,
            # unless the registry still calls it ready, which means the engine is in trouble.
            router.invalidate()
            current = gw.services.registry.get(record.id)
            if attempt == 2 or (current is not None and current.state == READY):
                raise APIError(502, "The model's engine refused the connection.",
                               type="server_error", code="engine_unreachable") from None
        except BaseException:
            usage.end(record.id)
            raise
    raise AssertionError("unreachable")


def _send(gw: Gateway, spec: ModelSpec, path: str, raw: bytes, request_id: str, stream: bool,
          release_lease) -> Response:
    usage = gw.usage
    record, upstream = _open_upstream(gw, spec, path, raw, request_id)

    headers = {"X-Request-Id": request_id}
    if not stream or upstream.status != 200:
        try:
            data = read_body(upstream)
        finally:
            usage.end(record.id)
            if release_lease is not None:
                release_lease()
        if upstream.status >= 400:
            data = normalise_engine_error(upstream.status, data)
            content_type = "application/json"  # our envelope, whatever the engine sent
        else:
            content_type = upstream.headers.get("Content-Type", "application/json")
        return Response(data, status=upstream.status, content_type=content_type, headers=headers)

    instance_id = record.id
    timer = StreamTimer(spec.id)

    def on_end(outcome: str) -> None:
        usage.end(instance_id)
        if release_lease is not None:
            release_lease()
        timer.end(outcome)

    headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(
        relay_stream(upstream, request.environ.get("gunicorn.socket"), on_end, timer.first),
        status=200,
        content_type=upstream.headers.get("Content-Type", "text/event-stream"),
        headers=headers,
        direct_passthrough=True,
    )


@bp.post("/v1/completions")
@require_scope("realtime")
@accepts(raw_body=COMPLETION, summary="A completion, relayed to the model's engine as sent",
         responses={503: "The model is starting or waking (Retry-After)."})
def completions():
    return _forward(COMPLETION, "/v1/completions")


@bp.post("/v1/chat/completions")
@require_scope("realtime")
@accepts(raw_body=CHAT_COMPLETION, summary="A chat completion, relayed to the model's engine",
         responses={503: "The model is starting or waking (Retry-After)."})
def chat_completions():
    return _forward(CHAT_COMPLETION, "/v1/chat/completions")


def _states() -> dict[str, str]:
    """Each model's most useful state among its instances: ready beats starting, etc."""
    rank = ("failed", "stopping", "draining", "sleeping", "starting", "ready")
    states: dict[str, str] = {}
    for record in services().registry.all():
        if rank.index(record.state) > rank.index(states.get(record.model, "failed")):
            states[record.model] = record.state
        else:
            states.setdefault(record.model, record.state)
    return states


def _model_object(spec: ModelSpec, states: dict[str, str]) -> dict:
    return {"id": spec.id, "object": "model", "created": 0, "owned_by": "llm-gateway",
            "engine": spec.engine, "state": states.get(spec.id, "stopped")}


@bp.get("/v1/models")
@require_scope("realtime")
@documented("The catalog's models this key may use, with their state")
def list_models():
    key = g.api_key
    states = _states()
    data = [_model_object(spec, states) for spec in services().catalog
            if key.allows_model(spec.id)]
    return {"object": "list", "data": data}


@bp.get("/v1/models/<path:model_id>")
@require_scope("realtime")
@documented("One model (ids hold slashes: /v1/models/org/name)")
def retrieve_model(model_id: str):
    spec = services().catalog.get(model_id)
    if spec is None or not g.api_key.allows_model(spec.id):
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found",
                       param="model")
    return _model_object(spec, _states())
