"""An engine's error answer rewritten into the API's error envelope, OpenAI's shape.

Engines do not answer errors as OpenAI does. vLLM answers
`{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`, older vLLM and SGLang
the same fields flat (`{"object": "error", "message", ...}`), a FastAPI route of theirs
`{"detail": ...}`, and a proxy or a dying engine text or nothing. OpenAI's SDKs and their callers
read `type` as one of OpenAI's few strings and `code` as a string or null, so every engine error
is rewritten: `type` from the status (as the gateway's own errors use them), the engine's
`message` kept, a string `code` kept (else one named after the status), a string `param` kept.

Plain JSON in and out, no Flask: the realtime relay uses it, and batch workers may too.
"""

from __future__ import annotations

import json

MAX_TEXT_MESSAGE = 500  # characters kept of an engine's non-JSON error body

# Status → (type, code) for engine errors that bring no string code of their own.
_BY_STATUS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an error answered with `status`."""
    if status >= 500:
        return "server_error"
    return _BY_STATUS.get(status, ("invalid_request_error", ""))[0]


def _default_code(status: int, param: str | None) -> str:
    if status == 404 and param == "model":
        return "model_not_found"
    if status >= 500 or status not in _BY_STATUS:
        return "engine_error"
    return _BY_STATUS[status][1]


def error_fields(parsed: object) -> dict | None:
    """The engine's error object, nested (vLLM) or flat (older vLLM, SGLang); else None."""
    if not isinstance(parsed, dict):
        return None
    if isinstance(parsed.get("error"), dict):
        return parsed["error"]
    if "message" in parsed or "detail" in parsed or parsed.get("object") == "error":
        return parsed
    return None


def _message(fields: dict | None, body: bytes, status: int) -> str:
    if fields is not None:
        for key in ("message", "detail"):
            value = fields.get(key)
            if isinstance(value, str) and value:
                return value
            if value:  # FastAPI's validation errors: a list of objects
                return json.dumps(value)[:MAX_TEXT_MESSAGE]
    elif body.strip():
        return body.decode(errors="replace").strip()[:MAX_TEXT_MESSAGE]
    return f"The model's engine answered {status} with no explanation."


def engine_error(status: int, fields: dict | None, body: bytes = b"") -> dict:
    """Our envelope for an engine's error object `fields` (None: its body was no JSON object)."""
    param = fields.get("param") if fields is not None else None
    param = param if isinstance(param, str) and param else None
    code = fields.get("code") if fields is not None else None
    if not isinstance(code, str) or not code:
        code = _default_code(status, param)
    return {"error": {"message": _message(fields, body, status), "type": error_type(status),
                      "code": code, "param": param}}


def normalise_engine_error(status: int, body: bytes) -> bytes:
    """The engine's error answer `body` (given with `status`) as our envelope's JSON."""
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        parsed = None
    return json.dumps(engine_error(status, error_fields(parsed), body)).encode()


def status_of(fields: dict) -> int:
    """The HTTP status an error object stands for when it came without one (an error event in a
    stream, answered with 200): vLLM puts it in `code`; without it, an engine error (500)."""
    code = fields.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 500
