"""Forwarding a call to an engine over pooled connections, and relaying its stream as it comes.

The request body is sent as the client sent it (no re-serialisation). A streamed answer is
relayed chunk by chunk as the engine writes it. If the client hangs up, the engine request is
closed at once (a watcher notices the hang-up even while the engine is silent), so the engine
frees the slot; if the engine dies mid-stream, the client gets an error event, never a hang.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from webapp.errors import APIError

log = logging.getLogger(__name__)

try:  # the watcher needs gevent (the web server's worker class); plain threads go without it
    import gevent
except ImportError:  # pragma: no cover - gevent is a runtime dependency
    gevent = None


class EngineUnreachable(Exception):
    """The engine refused the connection: it is gone or not listening."""


class EngineClient:
    def __init__(self, pool_size: int, connect_timeout: float, read_timeout: float):
        self.pool_size = pool_size
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._pools: dict[tuple[str, int], urllib3.HTTPConnectionPool] = {}

    def _pool(self, host: str, port: int) -> urllib3.HTTPConnectionPool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = urllib3.HTTPConnectionPool(
                host, port, maxsize=self.pool_size, block=False, retries=False
            )
            self._pools[(host, port)] = pool
        return pool

    def send(
        self, host: str, port: int, path: str, body: bytes, request_id: str
    ) -> urllib3.BaseHTTPResponse:
        """POST `body` to the engine; the answer's body is left unread for the caller."""
        try:
            return self._pool(host, port).urlopen(
                "POST",
                path,
                body=body,
                headers={"Content-Type": "application/json", "X-Request-Id": request_id},
                preload_content=False,
                decode_content=False,
                retries=False,
                redirect=False,
                timeout=self.timeout,
            )
        except (NewConnectionError, ConnectionRefusedError) as exc:
            raise EngineUnreachable(str(exc)) from None
        except (ConnectTimeoutError, ReadTimeoutError):
            raise APIError(
                504, "The model's engine did not answer in time.", type="server_error",
                code="engine_timeout",
            ) from None
        except (ProtocolError, HTTPError, OSError) as exc:
            log.warning("engine %s:%d failed: %s", host, port, exc)
            raise APIError(
                502, "The model's engine closed the connection without an answer.",
                type="server_error", code="engine_error",
            ) from None

    def drop(self, host: str, port: int) -> None:
        pool = self._pools.pop((host, port), None)
        if pool is not None:
            pool.close()


def read_body(upstream: urllib3.BaseHTTPResponse) -> bytes:
    try:
        data = upstream.read()
    except ReadTimeoutError:
        upstream.close()
        raise APIError(504, "The model's engine did not answer in time.", type="server_error",
                       code="engine_timeout") from None
    except (ProtocolError, HTTPError, OSError):
        upstream.close()
        raise APIError(502, "The model's engine broke off its answer.", type="server_error",
                       code="engine_error") from None
    upstream.release_conn()
    return data


def normalise_engine_error(status: int, body: bytes) -> bytes:
    """An engine's error body in our envelope (older vLLM answers a flat error object)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    message = parsed.get("message") if isinstance(parsed, dict) else None
    if not message:
        message = body.decode(errors="replace")[:500] or f"engine answered {status}"
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": error_type,
                                 "code": f"engine_{status}", "param": None}}).encode()


def _sse_error(message: str, code: str) -> bytes:
    payload = {"error": {"message": message, "type": "server_error", "code": code, "param": None}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _watch_client(client_sock: socket.socket, upstream: urllib3.BaseHTTPResponse, state: dict):
    """Wait for the client to hang up; then cut the engine request short."""
    try:
        data = client_sock.recv(1, socket.MSG_PEEK)
    except OSError:
        data = b""
    if data:
        return  # the client sent more (a pipelined request): it is still there
    state["client_gone"] = True
    conn = getattr(upstream, "connection", None)
    sock = getattr(conn, "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        upstream.close()
    except OSError:
        pass


def relay_stream(
    upstream: urllib3.BaseHTTPResponse,
    client_sock: socket.socket | None,
    on_end: Callable[[str], None],
) -> Iterator[bytes]:
    """Yield the engine's bytes as they arrive; `on_end(outcome)` runs exactly once at the end."""
    state = {"client_gone": False}
    watcher = None
    if client_sock is not None and gevent is not None:
        watcher = gevent.spawn(_watch_client, client_sock, upstream, state)
    outcome = "client_gone"
    try:
        # An empty first item makes the server send the headers now, not with the first token:
        # the client knows at once that its call was accepted.
        yield b""
        if upstream.chunked:
            chunks = upstream.read_chunked(decode_content=False)
        else:
            chunks = iter(lambda: upstream.read1(65536), b"")
        yield from chunks
        outcome = "complete"
    except (ProtocolError, HTTPError, OSError) as exc:
        if state["client_gone"]:
            outcome = "client_gone"
        else:
            outcome = "engine_error"
            log.warning("engine stream broke off: %s", exc)
            yield _sse_error("The model's engine stopped in the middle of the answer.",
                             "engine_disconnected")
    finally:
        if watcher is not None:
            # Blocking: the watcher must be gone before the server reads the client socket again.
            watcher.kill(block=True)
        if outcome == "complete":
            upstream.release_conn()
        else:
            upstream.close()
        on_end(outcome)
