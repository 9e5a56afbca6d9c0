"""Requests gunicorn refuses before the app sees them, answered in the API's error envelope.

Raw sockets against the real stack (gunicorn with the gateway's gevent worker): each request
breaks one of gunicorn's rules or limits, and the answer must be JSON in OpenAI's shape with
gunicorn's status, a message naming the limit, and none of the request's bytes.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.conftest import TOKENS


def exchange(stack, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw`, half-close, read the whole answer: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def refusal(stack, raw: bytes, status: int, code: str) -> str:
    """Assert gunicorn's refusal of `raw` is our envelope; return its message."""
    got, headers, body = exchange(stack, raw)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    assert b"<html" not in body.lower()
    error = json.loads(body)["error"]
    assert set(json.loads(body)) == {"error"}
    assert error == {"message": error["message"], "type": "invalid_request_error",
                     "code": code, "param": None}
    assert "Traceback" not in error["message"]
    return error["message"]


def test_request_line_over_the_limit_is_414(stack):
    message = refusal(stack, b"GET /v1/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                      414, "request_line_too_long")
    assert "limit of 4094 bytes" in message and "aaaa" not in message


def test_header_over_the_size_limit_is_431(stack):
    raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"
    message = refusal(stack, raw, 431, "header_too_large")
    assert "limit of 8190 bytes" in message and "bbbb" not in message


def test_too_many_headers_is_431(stack):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    message = refusal(stack, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n",
                      431, "too_many_headers")
    assert "limit of 100" in message


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3", b"5, 5"])
def test_bad_content_length_is_400(stack, length):
    raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + TOKENS["realtime"].encode() + b"\r\n"
           b"Content-Length: " + length + b"\r\n\r\n{}")
    message = refusal(stack, raw, 400, "invalid_content_length")
    assert "Content-Length" in message and length.decode() not in message


def test_content_length_with_chunked_is_400(stack):
    raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    refusal(stack, raw, 400, "invalid_content_length")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"GARBAGE", "invalid_request_line"),
        (b"GET /healthz", "invalid_request_line"),
        (b"GET /a\x01b HTTP/1.1", "invalid_request_line"),
        (b"GET healthz HTTP/1.1", "invalid_request_line"),
        (b"get /healthz HTTP/1.1", "invalid_method"),
        (b"GET /healthz HTTP/x", "invalid_http_version"),
        (b"GET /healthz HTTP/3.0", "invalid_http_version"),
    ],
)
def test_malformed_request_line_is_400(stack, line, code):
    message = refusal(stack, line + b"\r\nHost: x\r\n\r\n", 400, code)
    assert line.decode("latin-1") not in message


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"Bad Name: x", "invalid_header_name"),
        (b"X-Ctl: a\x01b", "invalid_header"),
        (b"no colon here", "invalid_header"),
    ],
)
def test_invalid_header_is_400(stack, header, code):
    message = refusal(stack, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n",
                      400, code)
    assert header.decode("latin-1") not in message


def test_bad_transfer_encoding_is_400_and_an_unknown_coding_501(stack):
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
    refusal(stack, post + b"chunked, chunked\r\n\r\n0\r\n\r\n", 400, "invalid_transfer_encoding")
    got, headers, body = exchange(stack, post + b"br, chunked\r\n\r\n0\r\n\r\n")
    assert got == 501 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "unsupported_transfer_coding"


def test_a_normal_request_still_works(stack):
    status, headers, body = exchange(
        stack, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json", body
    # And a request refused after a good one on the same connection gets the JSON answer.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nget / HTTP/1.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    second = data[data.index(b"HTTP/1.1 400"):]
    assert json.loads(second.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_method"


def test_refusals_are_in_the_access_log(stack):
    refusal(stack, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            400, "invalid_content_length")
    log = stack.log_path("web").read_text(errors="replace")
    assert re.search(r'"POST /v1/completions" 400 \d+ \d+ms rid=[0-9a-f]{32}', log)


def test_gunicorn_master_imports_nothing_of_the_app(stack):
    # The worker and logger classes are loaded in gunicorn's master without the `webapp`
    # package (webapp/gunicorn_conf.py): had it imported the app (ssl, urllib3...) before the
    # workers monkey-patch, gevent would warn in every worker.
    log = stack.log_path("web").read_text(errors="replace")
    assert "Booting worker" in log and "MonkeyPatchWarning" not in log
