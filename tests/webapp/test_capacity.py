"""One web instance holds 500 concurrent streaming calls: every one of them relayed whole.

A capacity check, not a timing one: 500 streams (50 tokens, 40 ms apart: two seconds each) are
opened at once through the gateway, and each must end with all its tokens and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.conftest import TOKENS, warm

STREAMS = 500
TOKENS_PER_STREAM = 50


async def _one(session: aiohttp.ClientSession, url: str, index: int) -> int:
    body = {"model": "sim/many", "prompt": f"stream {index}", "max_tokens": TOKENS_PER_STREAM,
            "stream": True}
    events = 0
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n\n")
            for line in lines:
                if line == b"data: [DONE]":
                    return events
                payload = json.loads(line.removeprefix(b"data: "))
                assert "error" not in payload, payload
                events += 1
    raise AssertionError(f"stream {index} ended without [DONE] after {events} events")


async def _all(base_url: str) -> list[int]:
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {TOKENS['realtime']}"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=timeout) as session:
        url = f"{base_url}/v1/completions"
        return await asyncio.gather(*(_one(session, url, i) for i in range(STREAMS)))


def test_five_hundred_concurrent_streams_through_one_web_instance(stack):
    warm(stack, "sim/many")
    counts = asyncio.run(_all(stack.base_url))
    assert len(counts) == STREAMS
    assert set(counts) == {TOKENS_PER_STREAM}
