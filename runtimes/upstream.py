"""A lean HTTP/1.1 client for the engines, with a keep-alive pool per engine.

The proxy's hot path spent over a third of its CPU in urllib3 (retry objects, response
wrappers, http.client's parser). Engines (vLLM and SGLang on uvicorn, the sim on aiohttp) speak
plain HTTP/1.1 with Content-Length or chunked bodies, so this sends each request in one write
and parses just what it needs. The proxy (webapp) and the batch workers (tasks) both use it;
under gevent (gunicorn's worker, Celery's gevent pool) the sockets are cooperative.

A reused connection that the engine closed while idle (uvicorn closes idle keep-alive
connections after a few seconds) fails before any byte of the answer; such a request is sent
once more on a new connection, as an HTTP client does for stale keep-alive connections.

An engine the orchestrator does not run (a catalog `upstream`: another team's vLLM, a hosted
OpenAI-compatible API) may want TLS and a bearer token: a pool made with `tls` wraps its
connections, and `extra_headers` go into every request it sends (`runtimes.upstreams`).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator

MAX_HEADER_BYTES = 64 * 1024
READ_BLOCK = 64 * 1024


class EngineUnreachable(Exception):
    """The engine refused the connection: it is gone or not listening."""


class EngineTimeout(Exception):
    """The engine did not answer within the read timeout."""


class EngineBrokeOff(Exception):
    """The engine closed the connection or sent something that is not HTTP."""


class _Stale(Exception):
    """A reused connection was closed by the engine before it answered."""


class UpstreamResponse:
    """The engine's answer: status and headers read, body read on demand."""

    def __init__(self, pool: EnginePool, sock: socket.socket, reader, status: int,
                 headers: dict[str, str]):
        self._pool = pool
        self._sock = sock
        self._reader = reader
        self.status = status
        self.headers = headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = int(length) if length is not None and not self.chunked else None
        self._keep_alive = headers.get("connection", "").lower() != "close"
        self._done = False

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        return b"".join(self.iter_body())

    def iter_body(self) -> Iterator[bytes]:
        """The body as it arrives: each chunk of a chunked answer as one item."""
        try:
            if self.chunked:
                yield from self._iter_chunked()
            elif self._length is not None:
                left = self._length
                while left:
                    block = self._reader.read1(min(left, READ_BLOCK))
                    if not block:
                        raise EngineBrokeOff("body cut short")
                    left -= len(block)
                    yield block
            else:
                self._keep_alive = False  # the body ends when the engine closes
                while block := self._reader.read1(READ_BLOCK):
                    yield block
        except TimeoutError:
            self.close()
            raise EngineTimeout("engine read timed out") from None
        except OSError as exc:
            self.close()
            raise EngineBrokeOff(str(exc)) from None
        except EngineBrokeOff:
            self.close()
            raise
        self._done = True
        self.release()

    def _iter_chunked(self) -> Iterator[bytes]:
        reader = self._reader
        while True:
            line = reader.readline(1024)
            if not line.endswith(b"\n"):
                raise EngineBrokeOff("chunk size line cut short")
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise EngineBrokeOff("bad chunk size") from None
            if size == 0:
                while reader.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = reader.read(size)
            if len(data) < size or reader.read(2) != b"\r\n":
                raise EngineBrokeOff("chunk cut short")
            yield data

    def release(self) -> None:
        """Give the connection back if the body was read whole; else close it."""
        if self._sock is None:
            return
        if self._done and self._keep_alive:
            self._pool.put(self._sock, self._reader)
            self._sock = self._reader = None
        else:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._reader.close()
                self._sock.close()
            finally:
                self._sock = self._reader = None


class EnginePool:
    """Idle keep-alive connections to one engine (host, port)."""

    def __init__(self, host: str, port: int, maxsize: int, connect_timeout: float,
                 read_timeout: float, tls: bool = False, extra_headers: bytes = b""):
        self.host = host
        self.port = port
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[tuple[socket.socket, object]] = []
        self._host_header = f"{host}:{port}".encode()
        self._tls = ssl.create_default_context() if tls else None
        self._extra = extra_headers  # whole header lines, each ending in CRLF

    def put(self, sock: socket.socket, reader) -> None:
        if len(self._idle) < self.maxsize:
            self._idle.append((sock, reader))
        else:
            reader.close()
            sock.close()

    def _connect(self) -> tuple[socket.socket, object]:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except ConnectionRefusedError as exc:
            raise EngineUnreachable(str(exc)) from None
        except TimeoutError:
            raise EngineTimeout("connect timed out") from None
        except OSError as exc:
            raise EngineUnreachable(str(exc)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise EngineUnreachable(f"TLS: {exc}") from None
        sock.settimeout(self.read_timeout)
        return sock, sock.makefile("rb", buffering=READ_BLOCK)

    def post(self, path: str, body: bytes, request_id: str,
             method: bytes = b"POST") -> UpstreamResponse:
        head = b"".join((
            method, b" ", path.encode(), b" HTTP/1.1\r\nHost: ", self._host_header,
            b"\r\nContent-Type: application/json\r\nContent-Length: ", str(len(body)).encode(),
            b"\r\nX-Request-Id: ", request_id.encode(), b"\r\n", self._extra, b"\r\n",
        ))
        while self._idle:
            sock, reader = self._idle.pop()
            try:
                return self._exchange(sock, reader, head + body)
            except _Stale:
                continue  # closed by the engine while idle: try the next one
        sock, reader = self._connect()
        try:
            return self._exchange(sock, reader, head + body)
        except _Stale:
            raise EngineBrokeOff("the engine closed the connection without an answer") from None

    def _exchange(self, sock, reader, request: bytes) -> UpstreamResponse:
        try:
            sock.sendall(request)
            status_line = reader.readline(MAX_HEADER_BYTES)
        except TimeoutError:
            sock.close()
            raise EngineTimeout("engine did not answer in time") from None
        except OSError:
            sock.close()
            raise _Stale() from None
        if not status_line:
            sock.close()
            raise _Stale()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            sock.close()
            raise EngineBrokeOff("not an HTTP answer")
        headers: dict[str, str] = {}
        try:
            while True:
                line = reader.readline(MAX_HEADER_BYTES)
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise EngineBrokeOff("headers cut short")
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except (OSError, EngineBrokeOff):
            sock.close()
            raise EngineBrokeOff("headers cut short") from None
        return UpstreamResponse(self, sock, reader, int(parts[1]), headers)


class EngineClient:
    """One pool per engine, per web worker."""

    def __init__(self, pool_size: int, connect_timeout: float, read_timeout: float):
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pools: dict[tuple[str, int], EnginePool] = {}

    def send(self, host: str, port: int, path: str, body: bytes, request_id: str,
             method: bytes = b"POST") -> UpstreamResponse:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = EnginePool(
                host, port, self.pool_size, self.connect_timeout, self.read_timeout)
        return pool.post(path, body, request_id, method)

    def send_to(self, record, path: str, body: bytes, request_id: str,
                method: bytes = b"POST") -> UpstreamResponse:
        """Send to an instance of the registry, or to an upstream the catalog names (its
        record's `meta`: base path, TLS, the bearer token's environment variable)."""
        meta = record.meta
        if record.backend != "upstream":
            return self.send(record.host, record.port, path, body, request_id, method)
        key = (record.host, record.port, "upstream", record.id)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = EnginePool(
                record.host, record.port, self.pool_size, self.connect_timeout,
                self.read_timeout, tls=meta.get("tls", False),
                extra_headers=upstream_headers(meta))
        return pool.post(upstream_path(meta.get("base_path", ""), path), body, request_id,
                         method)


def upstream_path(base_path: str, path: str) -> str:
    """Our route's path on an upstream whose base URL has `base_path` (`.../v1`): its `/v1`
    is the base's."""
    base = base_path.rstrip("/")
    if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
        return base + path[3:]
    return (base[:-3] if base.endswith("/v1") else base) + path


def upstream_headers(meta: dict) -> bytes:
    token = os.environ.get(meta.get("key_env") or "", "")
    return b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
