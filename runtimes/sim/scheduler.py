"""The sim engine's scheduler: a concurrency limit, with waiting requests served first-come
first-served, or by priority as vLLM's `--scheduling-policy priority` does."""

from __future__ import annotations

import asyncio
import heapq
import itertools

POLICIES = ("fcfs", "priority")


class SlotScheduler:
    """At most `capacity` requests generate at once; the rest wait.

    The waiting order is vLLM's: arrival order under `fcfs`; under `priority`, the lowest
    `priority` value first and arrival order among equals. Like vLLM, a waiting request never
    takes the slot of a running one: priority decides who goes next, not who is cut off.
    (vLLM preempts by priority only when the KV cache runs out, which the sim does not model.)
    asyncio.Semaphore does not promise FIFO hand-off on every Python 3.11 patch release, so
    slots are handed over explicitly from the releasing request to the next waiter.
    """

    def __init__(self, capacity: int, policy: str = "fcfs"):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, got {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.running = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._cancelled = 0  # waiters that gave up but are still in the heap

    @property
    def waiting(self) -> int:
        return len(self._waiters) - self._cancelled

    async def acquire(self, priority: int = 0) -> None:
        if self.running < self.capacity and not self.waiting:
            self.running += 1
            return
        slot = asyncio.get_running_loop().create_future()
        rank = priority if self.policy == "priority" else 0
        heapq.heappush(self._waiters, (rank, next(self._arrivals), slot))
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                # The slot was handed over just as the waiter gave up: pass it on.
                self.release()
            else:
                # Left in the heap (removing from its middle costs more); skipped when popped.
                self._cancelled += 1
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, slot = heapq.heappop(self._waiters)
            if slot.done():
                self._cancelled -= 1
                continue
            slot.set_result(None)  # the slot changes hands, so `running` stays the same
            return
        self.running -= 1
