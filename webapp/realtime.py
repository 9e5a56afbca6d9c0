"""The realtime API: `/v1/completions`, `/v1/chat/completions` (plain and streamed), `/v1/models`
and `/v1/models/{id}`; and `forward()`, the path of every engine route (`webapp.engine_api`,
`webapp.messages`).

A call is checked (key, scope, model and its kind, body), routed to a ready instance of its
model (a LoRA adapter's base, with the adapter loaded; an upstream's fixed record) and forwarded
as sent, save for `priority`, which the gateway sets (`runtimes.engine_priority`), and a
stream's `stream_options.include_usage` (`webapp.metering`). A model with no ready instance goes
through `coldstart`, or to its fallback for keys that opt in. This is the hot path: no Redis
round trip unless the key has limits or budgets, or the model is cold or an adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from flask import Blueprint, Response, g, request

from runtimes.catalog import GENERATE, AdapterSpec, ModelSpec
from runtimes.engine_errors import normalise_engine_error
from runtimes.engine_priority import REALTIME, set_engine_priority
from runtimes.engine_requests import CHAT_COMPLETION, COMPLETION
from runtimes.lora import AdapterLoadError
from runtimes.registry import READY, RuntimeRecord
from runtimes.upstream import EngineBrokeOff, EngineTimeout, EngineUnreachable
from runtimes.upstreams import health as upstream_health
from services.usage_ledger import UsageKey
from webapp import coldstart
from webapp.apidoc import accepts, documented
from webapp.auth import admit, check_model_allowed, require_scope, reserve_budget
from webapp.context import Gateway, gateway, services
from webapp.errors import APIError
from webapp.jsonbody import parse_json_object, read_request_body
from webapp.metering import USAGE_OPTION_PATHS, Meter, ask_for_usage
from webapp.metrics import StreamTimer
from webapp.relay import engine_failure, read_body, relay_stream
from webapp.schemas import validate_body

bp = Blueprint("realtime", __name__)


def model_spec(model: str) -> tuple[ModelSpec, AdapterSpec | None]:
    """The catalog entry that serves `model`: its own, or for a LoRA adapter its base's (with
    the adapter); 404 for a name the catalog does not know."""
    catalog = services().catalog
    spec = catalog.get(model)
    if spec is not None:
        return spec, None
    adapter = catalog.adapter(model)
    if adapter is not None:
        return catalog.get(adapter.base), adapter
    raise APIError(404, f"The model '{model}' does not exist.", code="model_not_found",
                   param="model")


def check_kind(spec: ModelSpec, kind: str, model: str) -> None:
    """400 when the route needs the other kind of model (embeddings from a generate model)."""
    if spec.kind != kind:
        raise APIError(400, f"The model '{model}' is a {spec.kind} model; this endpoint needs "
                            f"a {kind} model.", code="model_kind_mismatch", param="model")


def forward(schema, path: str, kind: str | None = GENERATE, priority: bool = True,
            watch: Callable[[RuntimeRecord, bytes], None] | None = None,
            error_shape: Callable[[int, bytes], bytes] = normalise_engine_error):
    """Check the call, send it to a ready instance of its model and relay the answer.

    `priority`: the call carries vLLM's `priority` (the Anthropic route does not: vLLM's Messages
    request has no such field); `watch(record, data)` sees the answer of a call that succeeded (a
    whole body, or a stream's chunks); `error_shape` writes an engine error in the route's
    envelope."""
    gw = gateway()
    raw = read_request_body()
    body = parse_json_object(raw)
    validate_body(schema, body)
    spec, adapter = model_spec(body["model"])
    if kind is not None:  # None: any model (tokenize)
        check_kind(spec, kind, body["model"])
    changed = priority and set_engine_priority(spec, body, REALTIME)  # most urgent, always
    stream = bool(body.get("stream"))
    strip_usage = stream and path in USAGE_OPTION_PATHS and ask_for_usage(body)
    if changed or strip_usage:
        raw = json.dumps(body, separators=(",", ":")).encode()
    g.model = body["model"]  # the model label of this call's metrics (webapp.metrics)
    key = g.api_key
    check_model_allowed(key, body["model"])
    release_lease = admit(key)
    try:
        reservation = reserve_budget(gw, key, raw, body)
    except BaseException:
        if release_lease is not None:
            release_lease()
        raise
    request_id = g.request_id  # webapp.request_id: the caller's or a new one
    gw.usage.arrived(spec.id)  # an adapter's demand is its base's
    meter = Meter(gw.usage, UsageKey(key.name, key.project, body["model"], "realtime"),
                  strip_usage, reservation.settle if reservation is not None else None)
    call = _Call(spec, adapter, path, raw, request_id, stream, watch, error_shape, meter,
                 fallback_allowed=key.fallback)
    try:
        return _send(gw, call, release_lease)
    except BaseException:
        if release_lease is not None:
            release_lease()
        if reservation is not None:
            reservation.settle(0)  # never sent, or no answer: nothing used
        raise


@dataclass(frozen=True, slots=True)
class _Call:
    spec: ModelSpec
    adapter: AdapterSpec | None
    path: str
    raw: bytes
    request_id: str
    stream: bool
    watch: Callable[[RuntimeRecord, bytes], None] | None
    error_shape: Callable[[int, bytes], bytes]
    meter: Meter
    fallback_allowed: bool = False
    answered_by: str | None = None  # the fallback that answers instead of the model asked


def _pick(gw: Gateway, call: _Call) -> tuple[RuntimeRecord, _Call]:
    """A ready instance of the call's model (cold: `coldstart`, or its fallback), with the
    adapter loaded; and the call as it goes there (to a fallback: with that model's name)."""
    router, usage, spec = gw.services.router, gw.usage, call.spec
    if call.adapter is None:
        record = router.pick(spec.id, usage.inflight)
        if record is not None:
            return record, call
        if spec.upstream_url is not None:
            raise APIError(503, f"The model '{spec.id}' is served elsewhere, and its upstream "
                                "does not answer its health check.", type="server_error",
                           code="upstream_unavailable", headers={"Retry-After": "5"})
        fallback = _fallback(gw, call)
        if fallback is not None:
            return fallback
        return coldstart.await_runtime(spec), call
    return _pick_with_adapter(gw, call), call


def _fallback(gw: Gateway, call: _Call) -> tuple[RuntimeRecord, _Call] | None:
    """The catalog's fallback of a cold or failed model, for a key that opted in: a ready
    instance of it and the call with its name; the cold model's start is asked for all the
    same (its demand noted), so later calls find it."""
    spec = call.spec
    if spec.fallback is None or not call.fallback_allowed:
        return None
    other = gw.services.catalog.get(spec.fallback)
    record = gw.services.router.pick(other.id, gw.usage.inflight) if other else None
    if record is None:
        return None
    gw.services.registry.note_demand(spec.id)
    gw.services.request_start(spec.id)
    body = json.loads(call.raw)
    body["model"] = other.id
    raw = json.dumps(body, separators=(",", ":")).encode()
    return record, replace(call, spec=other, raw=raw, answered_by=other.id)


def _pick_with_adapter(gw: Gateway, call: _Call) -> RuntimeRecord:
    router, usage, spec = gw.services.router, gw.usage, call.spec
    loader = gw.adapters
    have = loader.loaded_on(router.ready(spec.id), call.adapter.id)
    record = router.pick(spec.id, usage.inflight, prefer=have) or coldstart.await_runtime(spec)
    try:
        loader.ensure(record, spec, call.adapter, known_loaded=record.id in have)
    except AdapterLoadError as exc:
        raise APIError(exc.status, str(exc), type="server_error", code="adapter_load_failed",
                       param="model", headers={"Retry-After": "1"} if exc.status == 503
                       else None) from None
    return record


def _open_upstream(gw: Gateway, call: _Call):
    """Send the call to a ready instance; return it, the call as sent (to a fallback, with
    that model's name) and the engine's unread answer.

    The call counts as in flight on the instance from here; the caller ends it.
    """
    router, usage, client = gw.services.router, gw.usage, gw.engine_client
    for attempt in (1, 2):
        record, call = _pick(gw, call)
        usage.begin(record.id, call.spec.id)
        try:
            return record, call, client.send_to(record, call.path, call.raw, call.request_id)
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


def _send(gw: Gateway, call: _Call, release_lease) -> Response:
    usage = gw.usage
    record, call, upstream = _open_upstream(gw, call)
    if call.adapter is not None and upstream.status == 404:
        # The engine lost the adapter we thought loaded (it restarted under the same id): load
        # it once more and send again.
        data = read_body(upstream)
        usage.end(record.id)
        if b"does not exist" not in data:
            if release_lease is not None:
                release_lease()
            call.meter.whole(b"")  # counted, and its budget reservation settled
            return _whole(call, 404, data, "application/json")
        gw.adapters.reload(record, call.spec, call.adapter)
        record, call, upstream = _open_upstream(gw, call)

    if not call.stream or upstream.status != 200:
        try:
            data = read_body(upstream)
        finally:
            usage.end(record.id)
            if release_lease is not None:
                release_lease()
        call.meter.whole(data if upstream.status < 400 else b"")
        if upstream.status == 200 and call.watch is not None:
            call.watch(record, data)
        return _whole(call, upstream.status, data,
                      upstream.headers.get("Content-Type", "application/json"))

    instance_id = record.id
    timer = StreamTimer(call.spec.id)

    def on_end(outcome: str) -> None:
        usage.end(instance_id)
        if release_lease is not None:
            release_lease()
        timer.end(outcome)

    chunks = call.meter.stream(
        relay_stream(upstream, request.environ.get("gunicorn.socket"), on_end, timer.first))
    if call.watch is not None:
        chunks = _watched(chunks, record, call.watch)
    headers = {**_headers(call), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(chunks, status=200, headers=headers, direct_passthrough=True,
                    content_type=upstream.headers.get("Content-Type", "text/event-stream"))


def _whole(call: _Call, status: int, data: bytes, content_type: str) -> Response:
    if status >= 400:
        data = call.error_shape(status, data)
        content_type = "application/json"  # our envelope, whatever the engine sent
    return Response(data, status=status, content_type=content_type, headers=_headers(call))


def _headers(call: _Call) -> dict[str, str]:
    headers = {"X-Request-Id": call.request_id}
    if call.answered_by is not None:
        headers["X-Answered-By"] = call.answered_by  # a fallback; `model` says so too
    return headers


def _watched(chunks: Iterator[bytes], record: RuntimeRecord,
             watch: Callable[[RuntimeRecord, bytes], None]) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk:
            watch(record, chunk)
        yield chunk


@bp.post("/v1/completions")
@require_scope("realtime")
@accepts(raw_body=COMPLETION, summary="A completion, relayed to the model's engine as sent",
         responses={503: "The model is starting or waking (Retry-After)."})
def completions():
    return forward(COMPLETION, "/v1/completions")


@bp.post("/v1/chat/completions")
@require_scope("realtime")
@accepts(raw_body=CHAT_COMPLETION, summary="A chat completion, relayed to the model's engine",
         responses={503: "The model is starting or waking (Retry-After)."})
def chat_completions():
    return forward(CHAT_COMPLETION, "/v1/chat/completions")


def _states() -> dict[str, str]:
    """Each model's most useful state among its instances: ready beats starting, etc.; an
    upstream's is its last health check's (ready until checked)."""
    rank = ("failed", "stopping", "draining", "sleeping", "starting", "ready")
    states: dict[str, str] = {}
    for record in services().registry.all():
        if rank.index(record.state) > rank.index(states.get(record.model, "failed")):
            states[record.model] = record.state
        else:
            states.setdefault(record.model, record.state)
    checked = upstream_health(services().registry)
    for spec in services().catalog:
        if spec.upstream_url is not None:
            states[spec.id] = "ready" if checked.get(spec.id, {}).get("ok", True) else "failed"
    return states


def _model_object(spec: ModelSpec, states: dict[str, str],
                  adapter: AdapterSpec | None = None) -> dict:
    """A model, or an adapter (`parent`: its base, whose engines serve it, and its state)."""
    entry = {"id": spec.id, "object": "model", "created": 0, "owned_by": "llm-gateway",
             "engine": "upstream" if spec.upstream_url else spec.engine, "kind": spec.kind,
             "state": states.get(spec.id, "stopped")}
    if adapter is not None:
        entry.update(id=adapter.id, parent=spec.id, root=adapter.repo_id if adapter.hf_repo
                     else adapter.id)
    return entry


@bp.get("/v1/models")
@require_scope("realtime")
@documented("The catalog's models and LoRA adapters this key may use, with their state")
def list_models():
    key = g.api_key
    states = _states()
    catalog = services().catalog
    data = [_model_object(spec, states) for spec in catalog if key.allows_model(spec.id)]
    data += [_model_object(catalog.get(adapter.base), states, adapter)
             for adapter in catalog.adapters() if key.allows_model(adapter.id)]
    return {"object": "list", "data": data}


@bp.get("/v1/models/<path:model_id>")
@require_scope("realtime")
@documented("One model or adapter (ids hold slashes: /v1/models/org/name)")
def retrieve_model(model_id: str):
    catalog = services().catalog
    if g.api_key.allows_model(model_id) and (model_id in catalog or catalog.adapter(model_id)):
        spec, adapter = model_spec(model_id)
        return _model_object(spec, _states(), adapter)
    raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found",
                   param="model")
