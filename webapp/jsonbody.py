"""Reading a JSON request body safely: bounded in size (chunked bodies too) and in depth.

Werkzeug cuts a chunked body at `max_content_length` without saying so (the JSON then looks
malformed: a misleading 400), and Python's parser answers very deep nesting with a
RecursionError (a 500). Here a body over the limit is a 413 naming the limit, and nesting deeper
than `jobs.json_limits.MAX_DEPTH` a 400 naming it, on every JSON route, realtime included.
"""

from __future__ import annotations

from flask import request

from jobs import json_limits
from webapp.errors import APIError

_BLOCK = 64 * 1024


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes.",
                    code="request_too_large")


def read_request_body(limit: int | None = None) -> bytes:
    """The whole request body, at most `limit` bytes (default: the app's body limit), whether
    it came with a Content-Length or chunked; 413 past it."""
    limit = request.max_content_length if limit is None else limit
    length = request.content_length
    if length is not None and limit is not None and length > limit:
        raise too_large(limit)
    # The server's own stream ends the body (Content-Length or the last chunk): read it bounded
    # by hand instead of through Werkzeug's wrapper, which truncates silently at the limit.
    stream = request.environ["wsgi.input"]
    if length is not None:
        return stream.read(length) if length else b""
    if not request.environ.get("wsgi.input_terminated"):
        return b""  # no length and a server that does not end the stream: nothing safe to read
    parts, size = [], 0
    while True:
        block = stream.read(_BLOCK)
        if not block:
            return b"".join(parts)
        size += len(block)
        if limit is not None and size > limit:
            raise too_large(limit)
        parts.append(block)


def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object; a 400 in the OpenAI shape if it is not one."""
    if not raw:
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json_limits.loads(raw)
    except json_limits.TooDeep as exc:
        raise APIError(400, f"The request body {exc}.", code="json_too_deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def json_body() -> dict:
    """The request's JSON object, read and checked as above."""
    return parse_json_object(read_request_body())
