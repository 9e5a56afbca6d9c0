"""The sim engine's scheduler: a concurrency limit with first-come first-served waiting."""

from __future__ import annotations

import asyncio
from collections import deque


class SlotScheduler:
    """At most `capacity` requests generate at once; the rest wait in arrival order.

    asyncio.Semaphore does not promise FIFO hand-off on every Python 3.11 patch release, and
    vLLM's scheduler serves waiting requests first-come first-served, so slots are handed over
    explicitly from the releasing request to the oldest waiter.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            return
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                # The slot was handed over just as the waiter gave up: pass it on.
                self.release()
            else:
                self._waiters.remove(slot)
            raise

    def release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot changes hands, so `running` stays the same
                return
        self.running -= 1
