"""gunicorn's logger for the web process: access and error logs a caller cannot forge or read
tokens from.

The access log writes the decoded path (`%(U)s`), so `GET /v1/models%0aFORGED` would put a line
of the caller's making into it; every atom is escaped (`config.logsafe`) when the format reads
it. gunicorn's error log names whole request lines and URIs, query string and all, and
`/ui/api/...?key=` carries a token: its messages have query strings cut, then are escaped, and
an exception's trace keeps its lines, escaped and indented.

Set as `logger_class` in webapp/gunicorn_conf.py. Imports only gunicorn, the standard library
and `config.logsafe` (itself standard library only): gunicorn's master loads this module without
importing the `webapp` package (see `gunicorn_conf._load_gunicorn_side`).
"""

from __future__ import annotations

import logging
import re

from gunicorn.glogging import Logger, SafeAtoms

from config.logsafe import escape_controls, escape_lines

_QUERY = re.compile(r"\?[^\s'\"]*")
_TRACE = logging.Formatter()  # renders exception traces as every formatter does by default


class EscapedAtoms(SafeAtoms):
    """gunicorn's atoms (quotes escaped, a missing one "-") with control characters escaped as
    the format reads them: only the few atoms the format names cost anything."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return escape_controls(value) if isinstance(value, str) else value


class ErrorLogFilter(logging.Filter):
    """Cuts query strings from, and escapes, every record of gunicorn's error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: left to the handler
            return True
        if "?" in message:
            message = _QUERY.sub("?[query removed]", message)
        record.msg, record.args = escape_controls(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = escape_lines(_TRACE.formatException(record.exc_info))
        return True


class GatewayLogger(Logger):
    """gunicorn's logger with escaped access-log atoms and a filtered error log."""

    atoms_wrapper_class = EscapedAtoms

    def __init__(self, cfg):
        super().__init__(cfg)
        # On the logger, not its handlers: gunicorn replaces its handlers on a reload (and an
        # operator's logconfig may bring others), the logger stays.
        self.error_log.addFilter(ErrorLogFilter())
