"""Group commit of finished lines: many lines' results stored in one Redis round trip.

Lines of a chunk finish concurrently. The first to finish while no write is under way writes;
lines that finish meanwhile queue behind it and go in its next write. So under load one round
trip stores as many lines as finished during the previous one, and when lines finish one at a
time each is stored at once: there is no timer and nothing waits to fill a batch.

A worker killed between a line's answer and its write loses only that answer: the line is not
recorded, so the message's redelivery runs it again (the job store still refuses a second copy).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LineWriter(Generic[T]):
    def __init__(self, store: Callable[[list[T]], None]):
        self._store = store
        self._lock = threading.Lock()
        self._pending: list[T] = []
        self._writing = False
        self._idle = threading.Event()
        self._idle.set()

    def add(self, item: T) -> None:
        """Queue `item`; write it (and whatever queues meanwhile) unless a write is under way."""
        with self._lock:
            self._pending.append(item)
            if self._writing:
                return
            self._writing = True
            self._idle.clear()
        self._drain()

    def close(self) -> None:
        """Return once every item added is written: wait for a write under way, then write what
        is left. Raises what the store raised."""
        self._idle.wait()
        with self._lock:
            if not self._pending:
                return
            self._writing = True
            self._idle.clear()
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                with self._lock:
                    batch, self._pending = self._pending, []
                    if not batch:
                        self._writing = False
                        self._idle.set()
                        return
                self._store(batch)
        except BaseException:
            with self._lock:
                self._writing = False
                self._idle.set()
            raise
