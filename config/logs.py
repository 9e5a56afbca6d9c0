"""Logging set-up: plain text or one JSON object a line (`LOG_JSON`), with the request id.

Nothing here logs request headers or query strings, so a token cannot reach a log. What is
logged may hold a caller's text (a path, a model name): in plain text each record is one line
with its control characters escaped (config.logsafe), but for an exception's trace, which keeps
its lines, escaped and indented; in JSON, `json.dumps` escapes them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from config.logsafe import escape_controls, escape_lines


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record: the id of the request being handled (as `current`
    says: the web app's request context), else "-"."""

    def __init__(self, current: Callable[[], str | None] | None = None):
        super().__init__()
        self.current = current

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = (self.current() if self.current is not None else None) or "-"
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


class TextFormatter(logging.Formatter):
    """A record as one line, whatever its message holds; its trace below it, indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return escape_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return escape_lines(super().formatStack(stack_info))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] rid=%(request_id)s: %(message)s"


def configure_logging(level: str, as_json: bool,
                      request_id: Callable[[], str | None] | None = None) -> None:
    """Once per process: one handler on stderr; `request_id` says which request a record was
    written for (the web app's), if any."""
    root = logging.getLogger()
    if getattr(root, "_gateway_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter(request_id))
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 logs full URLs at debug level; keep it quiet whatever LOG_LEVEL says.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    root._gateway_configured = True
