"""The request id of every call: the caller's `X-Request-Id` when it is sane, else a new one.

It is set before any view runs (so auth errors carry it too), returned on every answer, sent to
the engine with a realtime call (webapp.realtime), and added to each log line written while the
request is handled (`current_request_id`, given to config.logs.configure_logging).
"""

from __future__ import annotations

import uuid

from flask import Flask, Response, g, has_request_context, request

MAX_LENGTH = 128


def _assign() -> None:
    rid = request.headers.get("X-Request-Id", "")
    if not rid or len(rid) > MAX_LENGTH or not rid.isprintable():
        rid = uuid.uuid4().hex
    g.request_id = rid


def _return(response: Response) -> Response:
    rid = g.get("request_id")
    if rid is not None:
        response.headers["X-Request-Id"] = rid
    return response


def current_request_id() -> str | None:
    """The id of the request this thread (greenlet) is handling, if any."""
    return g.get("request_id") if has_request_context() else None


def register_request_id(app: Flask) -> None:
    app.before_request(_assign)
    app.after_request(_return)
