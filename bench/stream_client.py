"""Closed-loop load of streamed completions, measuring time to first token and streams per second.

Run as its own process so its CPU never counts against the gateway's:

    python -m bench.stream_client --url http://127.0.0.1:8000/v1/completions \
        --model bench/realistic --concurrency 64 --seconds 10 [--token T] [--max-tokens 32]

It prints one JSON object. Each of `concurrency` tasks keeps one keep-alive connection (or, with
`--fresh-connections`, opens one per stream) and sends one streamed request after another until
the time is up; a stream counts once it has read
`data: [DONE]` and the end of the response. The HTTP/1.1 and SSE handling is a small asyncio
Protocol rather than a client library, so that the client costs little CPU per event: its own CPU
use is reported (`client_cpu_util`) to show it was not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit

_DONE = b"data: [DONE]"


class StreamFailed(Exception):
    """A stream that did not end with `data: [DONE]` after a 200 answer."""


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported value was observed)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats
    return ordered[int(rank) - 1]


class StreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends streamed POSTs and parses their events.

    Parsing happens synchronously in `data_received`: no coroutine is resumed per event, which
    keeps the client's CPU per event low (an asyncio StreamReader costs about twice as much).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future | None = None

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done() and exc is None:
            if self._state == "length" and self._length is None:
                # A body without length or chunks ends with the connection: that is its end.
                self._feed(self._buf)
                self._finish(None)
                return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                StreamFailed(f"connection lost after {self._tokens} events: {exc}")
            )

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._finish(StreamFailed(f"unparseable answer: {exc}"))

    # -- one request ------------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future:
        """Send `request`; the future gives (seconds to first token, seconds to end, events)."""
        assert self.transport is not None and not self.closed
        self._waiter = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._state = "head"
        self._status = 0
        self._chunked = False
        self._length: int | None = None
        self._keep_alive = True
        self._events = b""
        self._error_body = b""
        self._tokens = 0
        self._done = False
        self._first = 0.0
        self._started = time.perf_counter()
        self.transport.write(request)
        return self._waiter

    def _parse(self) -> None:
        while True:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self._buf = self._buf[:end], self._buf[end + 4 :]
                status_line, _, header_block = head.partition(b"\r\n")
                self._status = int(status_line.split(b" ", 2)[1])
                for line in header_block.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    name, value = name.strip().lower(), value.strip().lower()
                    if name == b"transfer-encoding":
                        self._chunked = value == b"chunked"
                    elif name == b"content-length":
                        self._length = int(value)
                    elif name == b"connection":
                        self._keep_alive = value != b"close"
                if not self._chunked and self._length is None:
                    self._keep_alive = False  # the body runs to the connection's end
                self._state = "chunked" if self._chunked else "length"
            elif self._state == "chunked":
                line_end = self._buf.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(self._buf[:line_end].split(b";", 1)[0], 16)
                if size == 0:
                    # The last chunk, then (no trailers expected) the blank line.
                    if len(self._buf) < line_end + 4:
                        return
                    self._buf = self._buf[line_end + 4 :]
                    self._finish(None)
                    return
                if len(self._buf) < line_end + 2 + size + 2:
                    return
                payload = self._buf[line_end + 2 : line_end + 2 + size]
                self._buf = self._buf[line_end + 2 + size + 2 :]
                self._feed(payload)
            else:  # "length": a plain body, whole
                if self._length is None or len(self._buf) < self._length:
                    return
                payload, self._buf = self._buf[: self._length], self._buf[self._length :]
                self._feed(payload)
                self._finish(None)
                return

    def _feed(self, payload: bytes) -> None:
        if self._status != 200:
            self._error_body += payload
            return
        events = self._events + payload
        # Events end with a blank line; a chunk may hold several events or part of one.
        start = 0
        while True:
            end = events.find(b"\n\n", start)
            if end < 0:
                break
            if events.startswith(_DONE, start):
                self._done = True
            elif events.startswith(b"data:", start):
                self._tokens += 1
                if not self._first:
                    self._first = time.perf_counter() - self._started
            start = end + 2
        self._events = events[start:]

    def _finish(self, error: Exception | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is None and self._status != 200:
            error = StreamFailed(f"status {self._status}: {self._error_body[:200]!r}")
        if error is None and not self._done:
            error = StreamFailed(f"stream ended without [DONE] after {self._tokens} events")
        if error is not None or not self._keep_alive:
            self.close()
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result((self._first, time.perf_counter() - self._started, self._tokens))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Connection:
    """A StreamProtocol that reconnects when its connection was closed."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.protocol: StreamProtocol | None = None

    async def stream(self, request: bytes) -> tuple[float, float, int]:
        if self.protocol is None or self.protocol.closed:
            loop = asyncio.get_running_loop()
            _, self.protocol = await loop.create_connection(StreamProtocol, self.host, self.port)
        return await self.protocol.send(request)

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.close()
            self.protocol = None


async def _worker(
    host: str,
    port: int,
    request: bytes,
    first_at: float,
    window: tuple[float, float],
    out: dict,
) -> None:
    window_start, window_end = window
    await asyncio.sleep(max(0.0, first_at - time.perf_counter()))
    conn = Connection(host, port)
    try:
        while time.perf_counter() < window_end:
            begun = time.perf_counter()
            try:
                ttft, total, tokens = await asyncio.wait_for(conn.stream(request), timeout=60)
            except (OSError, TimeoutError, StreamFailed) as exc:
                out["errors"] += 1
                if len(out["error_samples"]) < 5:
                    out["error_samples"].append(f"{type(exc).__name__}: {exc}")
                conn.close()
                await asyncio.sleep(0.01)  # a failing server is not to be hammered
                continue
            ended = begun + total
            out["all"] += 1
            out["tokens"] += tokens
            # Throughput: streams that ended inside the window, wherever they began.
            if window_start <= ended <= window_end:
                out["completed"] += 1
            # Latency: streams that began inside the window (the last ones run to their end).
            if begun >= window_start:
                out["ttft"].append(ttft)
                out["durations"].append(total)
    finally:
        conn.close()


async def run(
    url: str,
    model: str,
    concurrency: int,
    seconds: float,
    token: str | None,
    max_tokens: int,
    ramp: float,
    fresh_connections: bool = False,
) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps(
        {"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    ).encode()
    head = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if fresh_connections:
        head.append("Connection: close")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    out = {"completed": 0, "errors": 0, "ttft": [], "durations": [], "tokens": 0, "all": 0,
           "error_samples": []}  # fmt: skip
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    # Tasks start spread over the ramp: started together, streams of equal length would stay in
    # lockstep and completions would come in bursts of `concurrency`, so the count in a window
    # would move in steps of `concurrency`. The window opens once all tasks are running.
    window = (start + ramp, start + ramp + seconds)
    await asyncio.gather(
        *(
            _worker(host, port, request, start + ramp * i / concurrency, window, out)
            for i in range(concurrency)
        )
    )
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)

    ttft_ms = [t * 1000 for t in out["ttft"]]
    dur_ms = [t * 1000 for t in out["durations"]]
    completed = out["completed"]
    return {
        "url": url,
        "model": model,
        "concurrency": concurrency,
        "fresh_connections": fresh_connections,
        "seconds": seconds,
        "ramp_seconds": ramp,
        "wall_seconds": wall,
        "completed": completed,
        "all_streams": out["all"],
        "errors": out["errors"],
        "error_samples": out["error_samples"],
        "streams_per_s": completed / seconds,
        "tokens_per_stream": out["tokens"] / out["all"] if out["all"] else 0.0,
        "ttft_p50_ms": percentile(ttft_ms, 50),
        "ttft_p95_ms": percentile(ttft_ms, 95),
        "ttft_p99_ms": percentile(ttft_ms, 99),
        "duration_p50_ms": percentile(dur_ms, 50),
        "duration_p95_ms": percentile(dur_ms, 95),
        "client_cpu_s": cpu,
        "client_cpu_util": cpu / wall if wall else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="the /v1/completions URL")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument(
        "--ramp", type=float, default=0.5, help="seconds over which tasks start, not measured"
    )
    parser.add_argument("--token", default=None, help="bearer token (none for an engine)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--fresh-connections",
        action="store_true",
        help="one connection per stream (Connection: close), not keep-alive",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.url,
            args.model,
            args.concurrency,
            args.seconds,
            args.token,
            args.max_tokens,
            args.ramp,
            args.fresh_connections,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
