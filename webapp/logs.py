"""Logging set-up: plain text or one JSON object a line (`LOG_JSON`), with the request id.

Nothing here logs request headers or query strings, so a token cannot reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from flask import g, has_request_context


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record: the id of the request being handled, else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", "-") != "-":
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool) -> None:
    root = logging.getLogger()
    if getattr(root, "_gateway_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s[%(process)d] rid=%(request_id)s: %(message)s"
            )
        )
    handler.addFilter(RequestIdFilter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 logs full URLs at debug level; keep it quiet whatever LOG_LEVEL says.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    root._gateway_configured = True
