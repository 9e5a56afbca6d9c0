"""Keep-alive by history: how long an idle engine stays awake, then asleep, and when it is woken
ahead of its next call, from the model's own idle-time distribution. Pure, no I/O.

One fixed idle timeout is wrong both ways: it keeps a model whose calls come in short bursts
loaded long after each burst, and lets a model called every few minutes go cold between calls.
This is the hybrid histogram policy of Shahrad et al., "Serverless in the Wild" (USENIX ATC 2020),
on three levels instead of two (awake, asleep, stopped), because a vLLM engine asleep keeps only
its CUDA context on the GPU and wakes in a second or two:

- it stays *awake* while its history says that, idle this long, its next call more likely than
  not comes within `SLEEP_AFTER_SECONDS` (of its idle periods at least this long, half or more
  ended within that much more); it sleeps at the first idle time where that fails. Where too
  few idle periods were ever this long to say (`MIN_LONG_PERIODS`), the setting applies. So a
  model whose calls come in bursts minutes apart stays awake between them, one called at random
  every ten minutes goes to sleep at once; never past the idle timeout;
- it is *stopped* after the tail of its long idle periods (those it sleeps through), but never
  sooner than the idle timeout: a call that finds it stopped waits a whole cold start, while
  asleep it keeps only its context, so there the history may only lengthen it;
- when its long idle periods are alike (their tail within twice their head: a job every 15
  minutes) it is *woken ahead* of their head (5th percentile less 10 %), so the call finds it
  awake;
- with fewer idle periods than `MIN_IDLE_PERIODS` the history says nothing yet and the settings
  apply (`SLEEP_AFTER_SECONDS`, `IDLE_TIMEOUT_SECONDS`), as they do for a catalog entry that
  fixes `sleep_after_seconds` or `idle_timeout_seconds`.

Idle periods come from the arrival buckets the registry keeps (10 s each, `ArrivalHistory`), so
the real system and `bench.simulate` see them alike; a period is known to a bucket, and is taken
at its longest (the gap in buckets plus one), so windows err towards staying awake.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BUCKET_SECONDS = 10.0
# How far back idle periods count: the paper's histogram range.
HISTORY_SECONDS = 4 * 3600.0
MIN_IDLE_PERIODS = 10
# Long idle periods (longer than the awake window) needed before they set the stop and pre-warm.
MIN_LONG_PERIODS = 5
HEAD_PERCENTILE, TAIL_PERCENTILE = 5.0, 99.0
HEAD_MARGIN, TAIL_MARGIN = 0.9, 1.1
# A pre-warm is worth it only when the engine would sleep at least this long before it.
MIN_SLEEP_BEFORE_PREWARM = 60.0


@dataclass(frozen=True)
class CallHistory:
    """What the policy is told of one model's realtime calls: its idle periods over the last
    `HISTORY_SECONDS` (seconds, shortest first) and when its last call came."""

    gaps: tuple[float, ...] = ()
    last_call: float | None = None


@dataclass(frozen=True)
class KeepAlive:
    """Idle seconds after which an awake engine sleeps (`awake`) and any engine stops (`stop`);
    `prewarm`: seconds after the model's last call by which an asleep engine should be awake
    again, and `warm_until` how long after that call it then waits awake for it (None: no
    pre-warm); `basis`: why, for the actions' reasons."""

    awake: float
    stop: float
    prewarm: float | None = None
    warm_until: float | None = None
    basis: str = ""


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values` (not empty)."""
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def keep_alive(history: CallHistory | None, *, default_awake: float, default_stop: float,
               fixed_awake: float | None = None, fixed_stop: float | None = None) -> KeepAlive:
    """The windows for one model. `default_*`: the settings (the bounds the history moves
    within); `fixed_*`: the catalog entry's own figures, which always win."""
    gaps = history.gaps if history else ()
    awake = default_awake if fixed_awake is None else fixed_awake
    stop = max(default_stop, awake)
    if len(gaps) < MIN_IDLE_PERIODS:
        return KeepAlive(awake, stop if fixed_stop is None else fixed_stop,
                         basis=f"{len(gaps)} idle periods known: the defaults")
    if fixed_awake is None:
        awake = _awake_window(gaps, horizon=default_awake, limit=default_stop)
    basis = (f"{len(gaps)} idle periods: its next call likely within {default_awake:.0f} s "
             f"only up to {awake:.0f} s idle")
    long = [g for g in gaps if g > awake]
    prewarm = warm_until = None
    if len(long) >= MIN_LONG_PERIODS:
        long_tail = min(percentile(long, TAIL_PERCENTILE) * TAIL_MARGIN, HISTORY_SECONDS)
        stop = max(stop, long_tail)
        head = percentile(long, HEAD_PERCENTILE) * HEAD_MARGIN
        if head - awake >= MIN_SLEEP_BEFORE_PREWARM and long_tail <= 2 * head:
            prewarm, warm_until = head, long_tail
            basis += f"; after a pause it is called again from {head / HEAD_MARGIN:.0f} s"
    return KeepAlive(awake, stop if fixed_stop is None else fixed_stop, prewarm, warm_until,
                     basis)


def _awake_window(gaps: Sequence[float], *, horizon: float, limit: float) -> float:
    """The first idle time (on the bucket grid, up to `limit`) at which fewer than half of the
    idle periods at least that long ended within `horizon` more; where too few were that long,
    no sooner than `horizon` (the setting)."""
    t = BUCKET_SECONDS
    while t < limit:
        longer = len(gaps) - bisect.bisect_right(gaps, t)
        if longer < MIN_LONG_PERIODS:
            # The history knows too few idle periods this long to say: the setting applies.
            return min(limit, max(t, horizon))
        ended = bisect.bisect_right(gaps, t + horizon) - bisect.bisect_right(gaps, t)
        if 2 * ended < longer:
            return t
        t += BUCKET_SECONDS
    return limit


class ArrivalHistory:
    """The buckets in which each model's realtime calls arrived, over the last
    `HISTORY_SECONDS`; fed bucket by bucket (from the registry, or by the simulator)."""

    def __init__(self, bucket_seconds: float = BUCKET_SECONDS, span: float = HISTORY_SECONDS):
        self.bucket_seconds = bucket_seconds
        self.span_buckets = int(span // bucket_seconds)
        self._buckets: dict[str, list[int]] = {}
        self._cache: dict[str, CallHistory] = {}

    def add(self, model: str, bucket: int) -> None:
        buckets = self._buckets.setdefault(model, [])
        if buckets and buckets[-1] == bucket:
            return
        if not buckets or buckets[-1] < bucket:
            buckets.append(bucket)
        else:
            at = bisect.bisect_left(buckets, bucket)
            if at < len(buckets) and buckets[at] == bucket:
                return
            buckets.insert(at, bucket)
        self._cache.pop(model, None)

    def add_calls(self, model: str, times: Iterable[float]) -> None:
        for t in times:
            self.add(model, int(t // self.bucket_seconds))

    def prune(self, now: float) -> None:
        first = int(now // self.bucket_seconds) - self.span_buckets
        for model, buckets in self._buckets.items():
            cut = bisect.bisect_left(buckets, first)
            if cut:
                del buckets[:cut]
                self._cache.pop(model, None)

    def of(self, model: str) -> CallHistory:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        buckets = self._buckets.get(model) or []
        if not buckets:
            return CallHistory()
        size = self.bucket_seconds
        gaps = tuple(sorted((b - a + 1) * size for a, b in itertools.pairwise(buckets)))
        history = self._cache[model] = CallHistory(gaps=gaps, last_call=(buckets[-1] + 1) * size)
        return history

    def snapshot(self, now: float) -> dict[str, CallHistory]:
        self.prune(now)
        return {model: self.of(model) for model, buckets in self._buckets.items() if buckets}
