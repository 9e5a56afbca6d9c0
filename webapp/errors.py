"""The one error envelope of the API, shaped like OpenAI's.

Every error a client sees is `{"error": {"message", "type", "code", "param"}}` with a fitting
status: views raise `APIError`, Werkzeug's `HTTPException`s are translated, a Redis or broker
that cannot be reached (down, or failing over to a replica) is a 503 with `Retry-After`, and
anything else unexpected becomes a 500 whose trace goes to the log, never to the client.

The one exception is Anthropic's Messages API (`/v1/messages...`), whose clients read Anthropic's
shape, `{"type": "error", "error": {"type", "message"}}`: the same errors are written that way
there (`anthropic_error_body`), engine errors included.
"""

from __future__ import annotations

import json
import logging

import redis
from flask import Flask, Response, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from runtimes.engine_errors import engine_error, error_fields

log = logging.getLogger(__name__)

# Seconds a client is asked to wait when Redis is unreachable: Sentinel promotes a replica in a
# few seconds (down-after-milliseconds plus the election).
STORE_RETRY_AFTER = 2

# Status → (type, code) for errors that Werkzeug raises on its own.
_HTTP_DEFAULTS = {
    400: ("invalid_request_error", "bad_request"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


class APIError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "code": code, "param": param}}
    ).encode()


ANTHROPIC_PATHS = "/v1/messages"
# Status -> Anthropic's error type (its API reference, "Errors").
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> bytes:
    type_ = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else
                                 "invalid_request_error")
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}}).encode()


def anthropic_engine_error(status: int, body: bytes) -> bytes:
    """An engine's error answer on the Messages route, in Anthropic's shape (the message kept,
    whatever shape the engine wrote it in)."""
    ours = engine_error(status, error_fields(_json_or_none(body)), body)
    return anthropic_error_body(status, ours["error"]["message"])


def _json_or_none(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


def error_response(error: APIError) -> Response:
    body = (anthropic_error_body(error.status, error.message)
            if request.path.startswith(ANTHROPIC_PATHS)
            else error_body(error.message, error.type, error.code, error.param))
    response = Response(
        body,
        status=error.status,
        content_type="application/json",
    )
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(error: APIError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        type_, code = _HTTP_DEFAULTS.get(status, ("invalid_request_error", "http_error"))
        message = error.description or error.name
        if status == 413:
            # The limit of this request (a route such as file upload may lift the app's).
            limit = request.max_content_length
            message = f"Request body is larger than the limit of {limit} bytes."
        elif status == 404:
            message = f"Unknown path: {request.method} {request.path}"
        return error_response(APIError(status, message, type=type_, code=code))

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    @app.errorhandler(OperationalError)
    def _store_unavailable(error: Exception):
        # No trace: the cause is outside this process, and the next request may well succeed.
        log.warning("store unavailable on %s %s: %s", request.method, request.path,
                    type(error).__name__)
        return error_response(
            APIError(
                503,
                "The gateway's store is unavailable for a moment; retry shortly.",
                type="server_error",
                code="store_unavailable",
                headers={"Retry-After": str(STORE_RETRY_AFTER)},
            )
        )

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(
            APIError(
                500,
                "The server had an error while processing your request.",
                type="server_error",
                code="internal_error",
            )
        )
