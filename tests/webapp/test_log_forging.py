"""No caller can write a line of its own making into a log, nor a NUL or a bare CR.

Against the real stack, whose gunicorn's stdout and stderr (access log, error log, the app's
log) go to one file: paths with encoded newlines, header values and model names with control
characters must come out escaped. The app's formatters are checked on records directly.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess

import pytest
import redis as redis_lib

from config.logs import TEXT_FORMAT, JsonFormatter, RequestIdFilter, TextFormatter
from config.logsafe import escape_controls
from tests.conftest import DATA, raw_post
from tests.harness import REPO, VENV_BIN, Stack, wait_for
from webapp.gunicorn_logger import ErrorLogFilter


def send(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def new_log(stack: Stack, offset: int, marker: bytes) -> bytes:
    """What the web log got after `offset`, once `marker` is in it."""
    path = stack.log_path("web")
    return wait_for(lambda: (lambda new: new if marker in new else None)(
        path.read_bytes()[offset:]), 5, what=f"{marker!r} in the web log")


def assert_unforged(log: bytes, *forged: bytes) -> None:
    assert b"\x00" not in log and b"\r" not in log
    assert not re.search(rb"[\x01-\x08\x0b-\x1f\x7f]", log)
    for line in log.split(b"\n"):
        assert not line.startswith(forged), line


def test_encoded_newline_and_nul_in_the_path_are_escaped(stack):
    offset = stack.log_path("web").stat().st_size
    answer = send(stack.port, b"GET /v1/models%0aFORGED%00x%0d%0aFORGED2%09%1b[31m%7f%c2%85 "
                              b"HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    log = new_log(stack, offset, b"FORGED2")
    assert_unforged(log, b"FORGED")
    # gunicorn decodes the path as latin-1 (PEP 3333): the UTF-8 of U+0085 is "Â" and \x85.
    assert (r'"GET /v1/models\nFORGED\x00x\r\nFORGED2\t\x1b[31m\x7fÂ\x85" 404 '
            in log.decode()), log


def test_header_values_with_control_characters_never_reach_a_log(stack):
    offset = stack.log_path("web").stat().st_size
    # A tab and a C1 control pass gunicorn's header check: the request id is made up instead.
    answer = send(stack.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                              b"X-Request-Id: rid\tFORGED\x85x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    rid = re.search(rb"X-Request-Id: ([0-9a-f]{32})\r\n", answer).group(1)
    # One gunicorn refuses (a C0 control): refused as JSON, and the log names no value.
    refused = send(stack.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                               b"X-Note: a\x01\x1b]0;FORGED\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 400")
    log = new_log(stack, offset, b"Invalid HTTP Header")
    assert b'"GET /healthz" 200 ' in log and b"rid=" + rid in log
    assert b"FORGED" not in log and b"\x85" not in log and b"\t" not in log
    assert_unforged(log, b"FORGED")


def test_a_model_name_with_a_newline(stack):
    offset = stack.log_path("web").stat().st_size
    response = raw_post(stack, "/v1/completions",
                        {"model": "sim/fast\nFORGED-MODEL\r\x00", "prompt": "x"},
                        headers={"X-Request-Id": "model-newline-check"})
    # Unknown, so no engine sees it; the answer carries it JSON-escaped, no log line has it.
    assert response.status == 404
    assert response.json()["error"]["message"] == (
        "The model 'sim/fast\nFORGED-MODEL\r\x00' does not exist.")
    log = new_log(stack, offset, b"rid=model-newline-check")
    assert_unforged(log, b"FORGED")


def test_request_ids_must_be_printable(stack):
    # The caller's id is written to the access log and every app log line: only a printable one
    # is kept (a tab, a C1 control, the UTF-8 of a right-to-left override are not).
    for rid, kept in ((b"trace-1 ok", True), (b"a\tb", False), (b"a\x85b", False),
                      (b"a\xe2\x80\xaeb", False)):
        answer = send(stack.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"X-Request-Id: " + rid + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
        echoed = re.search(rb"X-Request-Id: ([^\r]*)\r\n", answer).group(1)
        assert (echoed == rid) is kept, rid
        assert kept or re.fullmatch(rb"[0-9a-f]{32}", echoed)


def _healthy(port: int) -> bool:
    try:
        return send(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    ).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@pytest.fixture(scope="module")
def web_with_header_atoms(tmp_path_factory, redis_server, keys_file):
    """A second web app whose access log also writes request headers and the request line."""
    web = Stack(tmp_path_factory.mktemp("web-atoms"), f"{redis_server.url}/3",
                DATA / "models.test.json", keys_file, WEB_CONCURRENCY="1")
    web.workdir.mkdir(parents=True, exist_ok=True)
    fmt = '%(h)s "%(r)s" %(s)s ua=%(a)s note=%({x-note}i)s referer=%(f)s'
    with open(web.log_path("web"), "ab") as log:
        web.procs["web"] = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py",
             "--access-logformat", fmt, "webapp.wsgi:app"],
            cwd=REPO, env=web.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_for(lambda: _healthy(web.port), 30, interval=0.2,
                 what=f"web on {web.base_url}\n{web.tail('web')}")
        yield web
    finally:
        web.stop()
        redis_lib.Redis.from_url(f"{redis_server.url}/3").flushdb()


def test_every_access_log_atom_is_escaped(web_with_header_atoms):
    web = web_with_header_atoms
    offset = web.log_path("web").stat().st_size
    send(web.port, b"GET /healthz?q=%0aFORGED HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"User-Agent: ua\tFORGED\x85\r\nX-Note: n\x9b31m\xa0\r\n"
                   b'Referer: "quoted"\r\n\r\n')
    log = new_log(web, offset, b"ua=")
    assert_unforged(log, b"FORGED")
    assert b"\x85" not in log and b"\x9b" not in log
    # The query is no control character (it stays encoded in the request line); quotes are
    # escaped as gunicorn does; NBSP (not printable to Python) is escaped too.
    assert (rb'"GET /healthz?q=%0aFORGED HTTP/1.1" 200 ua=ua\tFORGED\x85 note=n\x9b31m\xa0 '
            rb'referer=\"quoted\"' in log), log


# ---------------------------------------------------------------- formatters, directly


def _record(msg: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("webapp.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def _raised(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


def test_text_formatter_escapes_the_message_and_keeps_the_trace_apart():
    formatter = TextFormatter(TEXT_FORMAT)
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    record = _record("model %s failed", "a\r\nFORGED line\x00\x1b[2J\u2028",
                     exc=_raised("bad\nFORGED trace\r\x00"))
    assert handler.filter(record)
    text = handler.format(record)
    first, *trace = text.split("\n")
    assert first.endswith(r"model a\r\nFORGED line\x00\x1b[2J\u2028 failed")
    assert "\r" not in text and "\x00" not in text and "\x1b" not in text
    assert trace[0] == "    Traceback (most recent call last):"
    # The trace keeps its lines, each indented: none starts where a record starts.
    assert all(line.startswith("    ") for line in trace)
    assert trace[-2:] == ["    ValueError: bad", r"    FORGED trace\r\x00"]


def test_json_formatter_keeps_one_line_and_the_text_as_it_was():
    record = _record("model %s", "a\r\nFORGED\x00", exc=_raised("bad\nFORGED"))
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    entry = json.loads(line)
    assert entry["message"] == "model a\r\nFORGED\x00"
    assert entry["exc"].endswith("ValueError: bad\nFORGED")


def test_gunicorn_error_log_filter_cuts_queries_then_escapes():
    stream = io.StringIO()
    logger = logging.getLogger("test.gunicorn.error")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.handlers[:] = [handler]
    logger.filters[:] = [ErrorLogFilter()]
    logger.warning("Invalid request: %s", "GET /ui/api/overview?key=secret\nFORGED\x00 HTTP/1.1")
    try:
        raise ValueError("oops\nFORGED")
    except ValueError:
        logger.exception("Error handling request %s", "/x?key=secret")
    lines = stream.getvalue().splitlines()
    assert lines[0] == r"Invalid request: GET /ui/api/overview?[query removed]\nFORGED\x00 HTTP/1.1"
    assert lines[1] == "Error handling request /x?[query removed]"
    assert all(line.startswith("    ") for line in lines[2:])
    assert "secret" not in stream.getvalue()


def test_escape_controls():
    assert escape_controls("plain /v1/models") == "plain /v1/models"
    assert escape_controls("a\nb\rc\td\x00e\x7f\x85\u2028\u202e\U000e0001") == (
        r"a\nb\rc\td\x00e\x7f\x85\u2028\u202e\U000e0001")
    assert escape_controls("ünïcødé, emoji 🙂 ok") == "ünïcødé, emoji 🙂 ok"
