"""Anthropic's Messages API, relayed to the engines that serve it (vLLM's `/v1/messages`).

Tools that speak only Anthropic's API point its SDK at the gateway (`base_url`, our token as the
API key, which that SDK sends as `x-api-key`; a bearer token works too). The calls go through
`realtime.forward` like every realtime call, with two differences: vLLM's Messages request has
no `priority` field, so none is set (the call still ranks with realtime: vLLM's default 0 is the
realtime value, `runtimes.engine_priority`), and every error, the gateway's or the engine's, is
written in Anthropic's shape (`webapp.errors`), which its SDK reads.
"""

from __future__ import annotations

from flask import Blueprint

from runtimes.catalog import GENERATE
from runtimes.engine_requests import COUNT_TOKENS, MESSAGES
from webapp.apidoc import accepts
from webapp.auth import require_scope
from webapp.errors import anthropic_engine_error
from webapp.realtime import forward

bp = Blueprint("messages", __name__)


@bp.post("/v1/messages")
@require_scope("realtime", allow_x_api_key=True)
@accepts(raw_body=MESSAGES, summary="A message (Anthropic's Messages API), plain or streamed",
         responses={503: "The model is starting or waking (Retry-After)."},
         error_schema="AnthropicErrorResponse")
def create_message():
    return forward(MESSAGES, "/v1/messages", kind=GENERATE, priority=False,
                   error_shape=anthropic_engine_error)


@bp.post("/v1/messages/count_tokens")
@require_scope("realtime", allow_x_api_key=True)
@accepts(raw_body=COUNT_TOKENS, summary="The input tokens a message would take",
         responses={503: "The model is starting or waking (Retry-After)."},
         error_schema="AnthropicErrorResponse")
def count_tokens():
    return forward(COUNT_TOKENS, "/v1/messages/count_tokens", kind=GENERATE, priority=False,
                   error_shape=anthropic_engine_error)
