"""The rest of what vLLM serves, relayed like completions: embeddings, the Responses API,
tokenize and detokenize, rerank and score.

Every call goes through `realtime.forward` (key, scope, model allowlist, limits, cold start,
request id, metrics, byte-for-byte streaming), to an engine of the body's `model` of the kind the
route needs: embeddings, rerank and score want an `embedding` model (vLLM's pooling runner),
Responses a `generate` one, tokenize either. A stored response lives only in the engine that
made it, so the gateway notes its maker (`webapp.response_owners`) and sends its retrieval and
cancel there, for the same project only.
"""

from __future__ import annotations

from flask import Blueprint, Response, g

from runtimes.catalog import EMBEDDING, GENERATE
from runtimes.engine_errors import normalise_engine_error
from runtimes.engine_requests import DETOKENIZE, EMBEDDINGS, RERANK, RESPONSE, SCORE, TOKENIZE
from runtimes.registry import READY, RuntimeRecord
from runtimes.upstream import EngineBrokeOff, EngineTimeout, EngineUnreachable
from webapp.apidoc import accepts, documented
from webapp.auth import require_scope
from webapp.context import gateway
from webapp.errors import APIError
from webapp.realtime import forward
from webapp.relay import engine_failure, read_body
from webapp.response_owners import ResponseOwner, ResponseOwners, response_id_in

bp = Blueprint("engine_api", __name__)

_COLD = {503: "The model is starting or waking (Retry-After)."}


@bp.post("/v1/embeddings")
@require_scope("realtime")
@accepts(raw_body=EMBEDDINGS, summary="Embeddings from an embedding model's engine",
         responses=_COLD)
def embeddings():
    return forward(EMBEDDINGS, "/v1/embeddings", kind=EMBEDDING)


def _maker_noter(owners: ResponseOwners, project: str):
    """What notes the project and instance of the response an answer carries: a whole answer,
    or a stream's chunks (the first that names an id is noted, the rest pass untouched). It
    holds what it needs: a stream is read after the view has returned, outside its context."""
    noted = False

    def note(record: RuntimeRecord, data: bytes) -> None:
        nonlocal noted
        if noted:
            return
        response_id = response_id_in(data[:4096])
        if response_id is not None:
            noted = True
            owners.remember(response_id, ResponseOwner(project, record.id, record.model))

    return note


@bp.post("/v1/responses")
@require_scope("realtime")
@accepts(raw_body=RESPONSE, summary="A response (OpenAI's Responses API), plain or streamed",
         responses=_COLD)
def create_response():
    note = _maker_noter(gateway().responses, g.api_key.project)
    return forward(RESPONSE, "/v1/responses", kind=GENERATE, watch=note)


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"No response found with id '{response_id[:200]}'.",
                    code="response_not_found", param="response_id")


def _to_the_maker(response_id: str, suffix: str, method: bytes) -> Response:
    """Send a retrieval or cancel to the instance that made the response (this project's)."""
    gw = gateway()
    owner = gw.responses.owner(response_id, g.api_key.project)
    if owner is None or not g.api_key.allows_model(owner.model):
        raise _not_found(response_id)
    record = gw.services.registry.get(owner.instance_id)
    if record is None or record.state != READY or not record.port:
        raise _not_found(response_id)  # its engine is gone, and the response with it
    g.model = owner.model
    path = f"/v1/responses/{response_id}{suffix}"
    gw.usage.begin(record.id, record.model)
    try:
        upstream = gw.engine_client.send(record.host, record.port, path, b"", g.request_id,
                                         method=method)
        data = read_body(upstream)
    except (EngineTimeout, EngineBrokeOff) as exc:
        raise engine_failure(exc) from None
    except EngineUnreachable:
        raise _not_found(response_id) from None
    finally:
        gw.usage.end(record.id)
    content_type = upstream.headers.get("Content-Type", "application/json")
    if upstream.status >= 400:
        data, content_type = normalise_engine_error(upstream.status, data), "application/json"
    return Response(data, status=upstream.status, content_type=content_type,
                    headers={"X-Request-Id": g.request_id})


@bp.get("/v1/responses/<response_id>")
@require_scope("realtime")
@documented("A stored response, from the engine that made it (this project's only)")
def retrieve_response(response_id: str):
    return _to_the_maker(response_id, "", b"GET")


@bp.post("/v1/responses/<response_id>/cancel")
@require_scope("realtime")
@documented("Cancel a response running in the background, on the engine that made it")
def cancel_response(response_id: str):
    return _to_the_maker(response_id, "/cancel", b"POST")


@bp.post("/tokenize")
@require_scope("realtime")
@accepts(raw_body=TOKENIZE, summary="vLLM's tokenizer: a prompt or chat messages to token ids",
         responses=_COLD)
def tokenize():
    return forward(TOKENIZE, "/tokenize", kind=None, priority=False)


@bp.post("/detokenize")
@require_scope("realtime")
@accepts(raw_body=DETOKENIZE, summary="vLLM's detokenizer: token ids to text", responses=_COLD)
def detokenize():
    return forward(DETOKENIZE, "/detokenize", kind=None, priority=False)


@bp.post("/v1/rerank")
@require_scope("realtime")
@accepts(raw_body=RERANK, summary="Documents ranked against a query by an embedding model",
         responses=_COLD)
def rerank():
    return forward(RERANK, "/v1/rerank", kind=EMBEDDING)


@bp.post("/v1/score")
@require_scope("realtime")
@accepts(raw_body=SCORE, summary="Similarity scores of text pairs from an embedding model",
         responses=_COLD)
def score():
    return forward(SCORE, "/v1/score", kind=EMBEDDING)
