"""How the sim engine delivers a generation, whatever the API it was asked through.

Completions, chat, the Responses API and the Anthropic Messages API all go the same way once a
request is parsed: it is held while the engine sleeps, waits for a slot in the scheduler (in
`priority` order under that policy), then spends the simulated time of its tokens, either as
paced server-sent events or as one wait before a whole answer, and may crash the engine halfway
on purpose (`--crash-after`). Only the bodies differ, and those live with each API's module.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from runtimes.sim.server import SimEngine

CRASH_EXIT_CODE = 3
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def compact_json(value: object) -> str:
    # vLLM (pydantic) sends JSON without spaces; fewer bytes on the wire is also what we want.
    return json.dumps(value, separators=(",", ":"))


def crash(engine: SimEngine, ordinal: int) -> None:
    sys.stderr.write(
        f"sim engine: simulated crash during request {ordinal} (--crash-after "
        f"{engine.config.crash_after})\n"
    )
    sys.stderr.flush()
    # os._exit rather than sys.exit: a real engine crash does not unwind or close sockets nicely.
    os._exit(CRASH_EXIT_CODE)


def count_admission(engine: SimEngine) -> int:
    """Count one more accepted request; returns its ordinal when it is the one to crash in,
    else 0."""
    engine.requests_admitted += 1
    ordinal = engine.requests_admitted
    return ordinal if ordinal == engine.config.crash_after else 0


@asynccontextmanager
async def scheduled(engine: SimEngine, priority: int) -> AsyncIterator[float]:
    """Hold the request while the engine sleeps, then keep a scheduler slot for it; yields the
    loop time it was admitted at. A client that hangs up (aiohttp cancels the handler) is
    counted and frees its slot."""
    try:
        await engine.awake.wait()
        await engine.scheduler.acquire(priority)
    except asyncio.CancelledError:
        engine.metrics.client_disconnects += 1
        raise
    try:
        yield asyncio.get_running_loop().time()
    except asyncio.CancelledError:
        engine.metrics.client_disconnects += 1
        raise
    finally:
        engine.scheduler.release()


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


async def send_paced(
    response: web.StreamResponse,
    engine: SimEngine,
    steps: list[str],
    admitted: float,
    crash_ordinal: int,
) -> None:
    """Send each step's events when its token is due, crashing halfway if asked to."""
    loop = asyncio.get_running_loop()
    crash_step = len(steps) // 2 if crash_ordinal else -1
    # Events that are already due pile up and go out in one write at the next pause.
    pending: list[str] = []
    for step, events in enumerate(steps):
        delay = admitted + engine.ttft_seconds + step * engine.tpot_seconds - loop.time()
        if delay > 0:
            if pending:
                await response.write("".join(pending).encode())
                pending.clear()
            await asyncio.sleep(delay)
        if step == crash_step:
            if pending:
                await response.write("".join(pending).encode())
            crash(engine, crash_ordinal)
        pending.append(events)
    if pending:
        await response.write("".join(pending).encode())


async def stream_steps(
    response: web.StreamResponse,
    engine: SimEngine,
    steps: list[str],
    closing: str,
    timing: tuple[float, float],
    crash_ordinal: int,
) -> None:
    """Send one event group per token step, then `closing`, and end the stream; records the
    time to first token."""
    arrived, admitted = timing
    if engine.timed or crash_ordinal:
        await send_paced(response, engine, steps, admitted, crash_ordinal)
        engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
        await response.write(closing.encode())
    else:
        # Nothing to wait for between tokens: the whole stream goes out in one write.
        await response.write(("".join(steps) + closing).encode())
        engine.metrics.ttft.observe(asyncio.get_running_loop().time() - arrived)
    await response.write_eof()


async def spend_generation_time(
    engine: SimEngine, steps: int, admitted: float, crash_ordinal: int
) -> None:
    """Wait as long as generating `steps` tokens takes before a whole answer is sent."""
    busy_seconds = engine.ttft_seconds + (steps - 1) * engine.tpot_seconds
    if crash_ordinal:
        await asyncio.sleep(busy_seconds / 2)
        crash(engine, crash_ordinal)
    if engine.timed:
        delay = admitted + busy_seconds - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
