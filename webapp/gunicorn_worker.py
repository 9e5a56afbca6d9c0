"""gunicorn's gevent worker, answering the requests gunicorn refuses itself in the API's envelope.

gunicorn refuses some requests before the app sees them (a request line or headers over its
limits, a bad Content-Length, a malformed request line or header) and answers them in HTML. A
client of this API expects every error as `{"error": {"message", "type", "code", "param"}}`
(webapp.errors), so `GatewayWorker.handle_error` answers those in it, with gunicorn's status, a
message saying which rule or limit the request broke (never the request's own bytes, never a
trace) and an `X-Request-Id`, as every answer of the app has. Logging and the access log line
stay as gunicorn writes them (webapp.gunicorn_logger escapes them).

Set as `worker_class` in webapp/gunicorn_conf.py. Imports only gunicorn and the standard library:
gunicorn's master loads it, before the workers monkey-patch for gevent, without importing the
`webapp` package (see `gunicorn_conf._load_gunicorn_side`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus

from gunicorn import util
from gunicorn.http import errors
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.http.wsgi import Response, default_environ
from gunicorn.workers.ggevent import GeventWorker


@dataclass(frozen=True, slots=True)
class Refusal:
    """One error answer written by the worker instead of the app."""

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "code": self.code, "param": None}}).encode()

    def http_bytes(self, request_id: str) -> bytes:
        body = self.body()
        head = (f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n"
                "Connection: close\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"X-Request-Id: {request_id}\r\n\r\n")
        return head.encode("latin-1") + body


INTERNAL_ERROR = Refusal(500, "internal_error",
                         "The server had an error while processing your request.", "server_error")


def _limit(value: int, default: int) -> int:
    """A gunicorn limit as its parser applies it: 0 or less means the parser's own default."""
    return value if value > 0 else default


def _header_limit(exc: errors.LimitRequestHeaders, cfg) -> Refusal:
    fields = min(_limit(cfg.limit_request_fields, MAX_HEADERS), MAX_HEADERS)
    size = _limit(cfg.limit_request_field_size, DEFAULT_MAX_HEADERFIELD_SIZE)
    if str(exc) == "limit request headers fields":
        return Refusal(431, "too_many_headers",
                       f"The request has more header fields than the limit of {fields}.")
    if str(exc) == "limit request headers fields size":
        return Refusal(431, "header_too_large",
                       f"A request header field is longer than the limit of {size} bytes.")
    return Refusal(431, "headers_too_large",
                   f"The request's header fields are larger than the limit of {fields} fields "
                   f"of {size} bytes each.")


def _invalid_header(exc: errors.InvalidHeader) -> Refusal:
    # `hdr` is the header's name when gunicorn checked its value, else the raw line: only the
    # names of the framing headers are matched, nothing of it is repeated.
    if exc.hdr == "CONTENT-LENGTH":
        return Refusal(400, "invalid_content_length",
                       "The Content-Length header must be one non-negative integer, and may not "
                       "come with Transfer-Encoding: chunked.")
    if exc.hdr == "TRANSFER-ENCODING":
        return Refusal(400, "invalid_transfer_encoding",
                       "The Transfer-Encoding header must end with chunked, once, on HTTP/1.1.")
    return Refusal(400, "invalid_header",
                   "A request header is malformed: a line without a colon, or a value with a "
                   "control character.")


def refusal_for(exc: BaseException, cfg) -> Refusal | None:
    """The answer to a request gunicorn refused with `exc`; None when `exc` is no fault of the
    client's (the server's own error: a 500)."""
    # The application's own bad response headers are a server error, though they subclass the
    # request's header errors.
    if isinstance(exc, errors.InvalidResponseHeader | errors.InvalidResponseHeaderName):
        return None
    if isinstance(exc, errors.LimitRequestLine):
        limit = exc.max_size or _limit(cfg.limit_request_line, MAX_REQUEST_LINE)
        return Refusal(414, "request_line_too_long",
                       f"The request line (method, path and query string) is longer than the "
                       f"limit of {limit} bytes.")
    if isinstance(exc, errors.LimitRequestHeaders):
        return _header_limit(exc, cfg)
    if isinstance(exc, errors.InvalidHeader):
        return _invalid_header(exc)
    if isinstance(exc, errors.InvalidHeaderName):
        return Refusal(400, "invalid_header_name",
                       "A request header's name has a character header names may not have.")
    if isinstance(exc, errors.InvalidRequestLine):
        return Refusal(400, "invalid_request_line",
                       "The request line is malformed: it must be 'METHOD /path HTTP/1.1', with "
                       "no space or control character in the path.")
    if isinstance(exc, errors.InvalidRequestMethod):
        return Refusal(400, "invalid_method",
                       "The request method is not a valid HTTP method (upper-case letters).")
    if isinstance(exc, errors.InvalidHTTPVersion):
        return Refusal(400, "invalid_http_version",
                       "The request's HTTP version is not one this server speaks (HTTP/1.0, "
                       "HTTP/1.1).")
    if isinstance(exc, errors.ObsoleteFolding):
        return Refusal(400, "obsolete_line_folding",
                       "A request header is folded over several lines, which HTTP/1.1 forbids.")
    if isinstance(exc, errors.UnsupportedTransferCoding):
        return Refusal(501, "unsupported_transfer_coding",
                       "The request's Transfer-Encoding names a coding this server does not "
                       "support.")
    if isinstance(exc, errors.ExpectationFailed):
        return Refusal(417, "expectation_failed",
                       "The Expect header asks for something other than 100-continue.")
    if isinstance(exc, errors.InvalidChunkSize | errors.ChunkMissingTerminator
                  | errors.InvalidChunkExtension):
        return Refusal(400, "invalid_chunked_body", "The chunked request body is malformed.")
    if isinstance(exc, errors.ForbiddenProxyRequest):
        return Refusal(403, "forbidden_proxy_request",
                       "This address may not send a PROXY protocol header.", "permission_error")
    if isinstance(exc, errors.InvalidProxyLine | errors.InvalidProxyHeader):
        return Refusal(400, "invalid_proxy_header", "The PROXY protocol header is malformed.")
    if isinstance(exc, errors.InvalidSchemeHeaders):
        return Refusal(400, "invalid_scheme_headers",
                       "The request's forwarded-scheme headers contradict each other.")
    if isinstance(exc, errors.ConfigurationProblem):
        return None
    if isinstance(exc, errors.ParseException):
        # Whatever a newer gunicorn refuses that this list does not know yet: still the
        # request's fault, as gunicorn's base class of parse errors says.
        return Refusal(400, "bad_request", "The request could not be parsed as HTTP/1.1.")
    return None


class GatewayWorker(GeventWorker):
    """gunicorn's gevent worker whose own error answers are the API's JSON errors."""

    def handle_error(self, req, client, addr, exc):
        # gunicorn's Worker.handle_error, but for the answer it writes: its logging (a warning
        # for the client's faults, a trace for the server's) and its access log line are kept.
        request_start = datetime.now()
        addr = addr or ("", -1)  # a unix socket
        refusal = refusal_for(exc, self.cfg)
        if refusal is not None:
            self.log.warning("Invalid request from ip=%s: %s", addr[0], exc)
            if req is None and isinstance(exc, errors.InvalidHeader):
                req = exc.req  # for the access log: the request whose headers were read
        else:
            refusal = INTERNAL_ERROR
            if hasattr(req, "uri") and hasattr(req, "method"):
                self.log.exception("Error handling request %s %s", req.method, req.uri)
            elif hasattr(req, "uri"):
                self.log.exception("Error handling request %s", req.uri)
            else:
                self.log.exception("Error handling request (no URI read)")
        request_id = uuid.uuid4().hex
        if req is not None:
            environ = default_environ(req, client, self.cfg)
            environ["REMOTE_ADDR"] = addr[0]
            environ["REMOTE_PORT"] = str(addr[1])
            # The access log's path (gunicorn leaves it out here, and logs "None").
            environ["PATH_INFO"] = util.unquote_to_wsgi_str(getattr(req, "path", "") or "")
            resp = Response(req, client, self.cfg)
            resp.status = f"{refusal.status} {HTTPStatus(refusal.status).phrase}"
            resp.headers = [("X-Request-Id", request_id)]
            resp.response_length = resp.sent = len(refusal.body())
            self.log.access(resp, req, environ, datetime.now() - request_start)
        try:
            util.write_nonblock(client, refusal.http_bytes(request_id))
        except OSError:
            self.log.debug("Failed to send error message.")
