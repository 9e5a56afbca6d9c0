"""Group commit of finished lines: many lines' results stored in one Redis round trip.

One writer per job per worker process, shared by all the job's chunks running there. A line
that finishes hands its result over and goes on; a writer thread stores whatever has queued,
in one round trip, for as long as results keep coming, then ends. So under load one write holds
every line that finished during the previous write, and a line finishing alone is written at
once: no timer, nothing waits to fill a batch. A chunk waits until its own lines are written
before it counts itself done.

A worker killed between a line's answer and its write loses only that answer: the line is not
recorded, so the message's redelivery runs it again (the job store still refuses a second copy).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LineWriter(Generic[T]):
    def __init__(self, store: Callable[[list[T]], None]):
        self._store = store
        self._cond = threading.Condition()
        self._pending: list[T] = []
        self._added = 0  # items added so far: item n is the n-th
        self._settled = 0  # items whose write has ended, stored or failed (writes go in order)
        self._failed: collections.deque[tuple[int, int, BaseException]] = collections.deque(
            maxlen=64)  # (first, last item, what the store raised) of recent failed writes
        self._writing = False

    def add(self, item: T) -> int:
        """Queue `item` to be written; return its number, for `wait`."""
        with self._cond:
            self._pending.append(item)
            self._added += 1
            number = self._added
            start = not self._writing
            self._writing = True
        if start:
            threading.Thread(target=self._drain, daemon=True, name="line-writer").start()
        return number

    def wait(self, first: int, last: int) -> None:
        """Return once items `first`..`last` are written; raise what the store raised if a
        write that may have held one of them failed (their lines are then not recorded)."""
        with self._cond:
            self._cond.wait_for(lambda: self._settled >= last)
            for low, high, exc in self._failed:
                if low <= last and high >= first:
                    raise exc

    def _drain(self) -> None:
        while True:
            with self._cond:
                batch, self._pending = self._pending, []
                if not batch:
                    self._writing = False
                    return
                low, high = self._settled + 1, self._settled + len(batch)
            try:
                self._store(batch)
            except BaseException as exc:
                with self._cond:
                    self._failed.append((low, high, exc))
                if not isinstance(exc, Exception):  # the worker is going away
                    with self._cond:
                        self._settled, self._writing = self._added, False
                        self._pending = []
                        self._failed.append((high + 1, self._added, exc))
                        self._cond.notify_all()
                    raise
                log.warning("storing %d line results failed: %s", len(batch), exc)
            with self._cond:
                self._settled = high
                self._cond.notify_all()
