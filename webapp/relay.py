"""The engine's answer to the client: the body, an error in our envelope, or the stream.

The call itself goes out through `runtimes.upstream` with the body as the client sent it (no
re-serialisation). A streamed answer is relayed chunk by chunk as the engine writes it. If the
client hangs up, the engine request is closed at once (a watcher notices the hang-up even while
the engine is silent), so the engine frees the slot; if the engine dies mid-stream, the client
gets an error event, never a hang. The engine's errors, answered whole or as an event in a
stream, reach the client in our envelope (`runtimes.engine_errors`), never in vLLM's shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable, Iterator

from runtimes.engine_errors import engine_error, error_fields, status_of
from runtimes.upstream import EngineBrokeOff, EngineTimeout, UpstreamResponse
from webapp.errors import APIError

log = logging.getLogger(__name__)

try:  # the watcher needs gevent (the web server's worker class); plain threads go without it
    import gevent
except ImportError:  # pragma: no cover - gevent is a runtime dependency
    gevent = None


def engine_failure(exc: EngineTimeout | EngineBrokeOff) -> APIError:
    """The client's answer when the engine timed out (504) or broke off (502)."""
    if isinstance(exc, EngineTimeout):
        return APIError(504, "The model's engine did not answer in time.", type="server_error",
                        code="engine_timeout")
    return APIError(502, "The model's engine broke off its answer.", type="server_error",
                    code="engine_error")


def read_body(upstream: UpstreamResponse) -> bytes:
    try:
        return upstream.read()
    except (EngineTimeout, EngineBrokeOff) as exc:
        raise engine_failure(exc) from None


def _rewrite_error_event(chunk: bytes) -> bytes:
    """`chunk` with the engine's error event at its start in our envelope; unchanged when that
    is no JSON error object after all."""
    event, separator, rest = chunk.partition(b"\n\n")
    try:
        parsed = json.loads(event[len(b"data:"):])
    except ValueError:
        return chunk
    fields = error_fields(parsed)
    if fields is None:
        return chunk
    rewritten = json.dumps(engine_error(status_of(fields), fields)).encode()
    return b"data: " + rewritten + separator + rest


# How an engine's error event starts: vLLM's nested object, or the flat one of older vLLM and
# SGLang (pydantic writes `object` first).
_ERROR_EVENT = (b'data: {"error"', b'data: {"object":"error"', b'data: {"object": "error"')


def _sse_error(message: str, code: str) -> bytes:
    payload = {"error": {"message": message, "type": "server_error", "code": code, "param": None}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _watch_client(client_sock: socket.socket, upstream: UpstreamResponse, state: dict):
    """Wait for the client to hang up; then cut the engine request short."""
    try:
        data = client_sock.recv(1, socket.MSG_PEEK)
    except OSError:
        data = b""
    if data:
        return  # the client sent more (a pipelined request): it is still there
    state["client_gone"] = True
    # Shut the engine socket down (the reading side then sees the end at once); closing it
    # here is left to the reader, which owns it.
    sock = upstream.socket
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def relay_stream(
    upstream: UpstreamResponse,
    client_sock: socket.socket | None,
    on_end: Callable[[str], None],
    on_first: Callable[[], None] | None = None,
) -> Iterator[bytes]:
    """Yield the engine's bytes as they arrive; `on_end(outcome)` runs exactly once at the end,
    `on_first()` when the engine's first bytes came (time to first token)."""
    state = {"client_gone": False}
    watcher = None
    if client_sock is not None:
        # Tokens are small writes that must leave at once, not wait for the previous one's ACK.
        with contextlib.suppress(OSError):
            client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if client_sock is not None and gevent is not None:
        watcher = gevent.spawn(_watch_client, client_sock, upstream, state)
    outcome = "client_gone"
    try:
        # An empty first item makes the server send the headers now, not with the first token:
        # the client knows at once that its call was accepted.
        yield b""
        chunks = upstream.iter_body()
        if on_first is not None:
            for chunk in chunks:  # the first chunk only: its arrival is the time to first token
                on_first()
                yield _rewrite_error_event(chunk) if chunk.startswith(_ERROR_EVENT) else chunk
                break
        for chunk in chunks:
            # vLLM reports an error met after the answer began as an event of its own (one
            # chunk): the one test per chunk is a prefix match, the rewrite only for that event.
            yield _rewrite_error_event(chunk) if chunk.startswith(_ERROR_EVENT) else chunk
        outcome = "complete"
    except (EngineBrokeOff, EngineTimeout) as exc:
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
            upstream.release()
        else:
            upstream.close()
        on_end(outcome)
