"""Admission of batch lines to their model's engines, shared by the lines of one worker process.

The cap on batch lines in flight per model holds across every batch worker process, so each
line in flight holds a lease in Redis (`LeaseSet`). Taking and giving back a lease for every
line cost two Redis round trips a line, and every line that found the cap full polled Redis on
its own. Here a process keeps the leases its lines use:

- a line that ends hands its lease straight to the next line of the same model waiting in this
  process, highest job priority first (no round trip); a lease nobody here waits for goes back
  to Redis at once;
- one filler per model asks Redis for as many leases as lines wait, and only it polls while the
  cap is full;
- every `sync_seconds` (on a line's end) the leases in use are refreshed and counted: above the
  cap the autoscaler set (it lowers the cap when realtime traffic needs the engine), or above a
  fair share while other processes wait for the same model, leases go back as their lines end.
  That is how quickly batch yields to realtime.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

import redis

from runtimes.leases import LeaseSet

log = logging.getLogger(__name__)

# A waiting line looks this often that a filler is running for its model (one always should be).
FILLER_CHECK_SECONDS = 10.0


class _Waiter:
    __slots__ = ("event", "lease", "wanted")

    def __init__(self, wanted: Callable[[], bool]) -> None:
        self.event = threading.Event()
        self.lease: str | None = None
        self.wanted = wanted


class _Model:
    """One model's state in this process."""

    def __init__(self) -> None:
        self.waiters: list[tuple[int, int, _Waiter]] = []  # heap of (-priority, arrival, waiter)
        self.held: set[str] = set()  # leases in use by this process's lines
        self.surplus = 0  # leases to give back as lines end instead of handing them on
        self.share = 0  # while other processes wait for this model: the most to hold here
        self.filling = False
        self.checked = time.monotonic()  # when the filler last asked waiters if still wanted
        self.syncing = False
        self.synced = time.monotonic()


class AdmissionGate:
    def __init__(self, leases: LeaseSet, cap: Callable[[str], int], sync_seconds: float = 0.5,
                 poll_seconds: float = 0.05, check_seconds: float = 0.25):
        self.leases = leases
        self.cap = cap  # lines of a model allowed in flight, over all processes
        self.sync_seconds = sync_seconds
        self.poll_seconds = poll_seconds
        self.check_seconds = check_seconds
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._arrivals = itertools.count()

    def acquire(self, model: str, priority: int, wanted: Callable[[], bool]) -> str | None:
        """A lease for one call to `model`; None once `wanted()` turns False while waiting.
        The filler asks every `check_seconds` (`wanted` must be cheap): thousands of waiting
        lines do not each wake up to look."""
        waiter = _Waiter(wanted)
        with self._lock:
            state = self._models.setdefault(model, _Model())
            heapq.heappush(state.waiters, (-priority, next(self._arrivals), waiter))
        self._ensure_filler(model, state)
        while not waiter.event.wait(FILLER_CHECK_SECONDS):
            self._ensure_filler(model, state)  # never left waiting with no filler
        return waiter.lease

    def _ensure_filler(self, model: str, state: _Model) -> None:
        with self._lock:
            if state.filling or not state.waiters:
                return
            state.filling = True
        threading.Thread(target=self._fill, args=(model, state), daemon=True,
                         name=f"admission-{model}").start()

    def release(self, model: str, lease: str) -> None:
        state = self._models[model]
        give_back = None
        now = time.monotonic()
        with self._lock:
            if lease not in state.held:
                return  # lost (see _sync): Redis no longer counts it
            if state.surplus > 0 or not state.waiters:
                state.surplus = max(0, state.surplus - 1)
                state.held.discard(lease)
                give_back = lease
            else:
                self._grant(heapq.heappop(state.waiters)[2], lease)
            sync = not state.syncing and now - state.synced >= self.sync_seconds
            if sync:
                state.syncing, state.synced = True, now
        if give_back is not None:
            self.leases.release(model, give_back)
        if sync:
            self._sync(model, state)

    def in_use(self, model: str) -> int:
        with self._lock:
            state = self._models.get(model)
            return len(state.held) if state else 0

    @staticmethod
    def _grant(waiter: _Waiter, lease: str) -> None:
        waiter.lease = lease
        waiter.event.set()

    def _fill(self, model: str, state: _Model) -> None:
        """Ask Redis for leases while lines of `model` wait here; one filler per model."""
        try:
            while True:
                try:
                    if not self._fill_once(model, state):
                        return  # it cleared `filling` as it found no line waiting
                except Exception:  # Redis away, a cap it could not read: keep the lines waiting
                    log.exception("batch admission for %s failed; trying again in 1 s", model)
                    time.sleep(1.0)
        except BaseException:  # the worker is going away
            with self._lock:
                state.filling = False
            raise

    def _fill_once(self, model: str, state: _Model) -> bool:
        """One round of leases for the lines waiting; False when none waits."""
        cap = self.cap(model)
        with self._lock:
            if not state.waiters:
                state.filling = False  # in the same step: a line arriving now starts a filler
                return False
            # No more than the cap could grant were every other holder's lines done, nor more
            # than this process's share while other processes wait too.
            wanted = min(len(state.waiters), min(cap, state.share or cap) - len(state.held))
        granted = self.leases.acquire_many(model, cap, wanted) if wanted > 0 else []
        spare = []
        with self._lock:
            for lease in granted:
                if state.waiters:
                    state.held.add(lease)
                    self._grant(heapq.heappop(state.waiters)[2], lease)
                else:
                    spare.append(lease)  # its line stopped waiting meanwhile
        if spare:
            self.leases.release(model, *spare)
        if len(granted) < wanted or wanted <= 0:
            time.sleep(self.poll_seconds)
            self._drop_unwanted(state)
        return True

    def _drop_unwanted(self, state: _Model) -> None:
        """Every `check_seconds`, wake the waiters no longer wanted (their job stopped) with
        no lease."""
        now = time.monotonic()
        if now - state.checked < self.check_seconds:
            return
        state.checked = now
        with self._lock:
            waiters = list(state.waiters)
        dropped = [entry for entry in waiters if not entry[2].wanted()]
        if not dropped:
            return
        with self._lock:
            gone = {id(entry[2]) for entry in dropped}
            state.waiters = [entry for entry in state.waiters if id(entry[2]) not in gone]
            heapq.heapify(state.waiters)
        for _, _, waiter in dropped:
            waiter.event.set()  # with no lease: acquire returns None

    def _sync(self, model: str, state: _Model) -> None:
        """Refresh this process's leases; count them against the cap and a fair share."""
        try:
            with self._lock:
                mine = list(state.held)
                waiting = bool(state.waiters)
            total, lost, others_waiting = self.leases.refresh(model, mine, waiting)
            cap = self.cap(model)
            with self._lock:
                state.held -= lost
                over = total - cap
                state.share = max(1, cap // (others_waiting + 1)) if others_waiting else 0
                if state.share:
                    over = max(over, len(state.held) - state.share)
                state.surplus = max(0, min(over, len(state.held)))
        except redis.RedisError as exc:
            log.warning("batch admission for %s: could not refresh leases: %s", model, exc)
        finally:
            with self._lock:
                state.syncing = False
