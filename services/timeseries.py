"""The dashboard's charts: a small time series of the last two hours in Redis, 10 s a bucket.

Nothing here touches Redis on the hot path. A web worker adds each realtime call to counters in
memory (`SeriesRecorder.request`); its usage reporter (webapp.usage) writes them about once a
second in one pipelined round trip (`flush`). Latencies go into fixed histogram bins (each 1.5
times the last, from 1 ms), so the p50/p95 of a bucket are read back from summed bins, whichever
workers served the calls. Cold starts are written by the control worker when they happen (they
are rare). Queue depths are sampled once a bucket, by whichever web worker claims it first.

One hash per bucket, `gw:series:<unix time // 10>`, kept two hours. Its fields:

    n|<model>        realtime calls answered        e|<model>       of them answered >= 500
    lat|<bin>        latency of successful calls    ttft|<bin>      time to first token (streams)
    cold|<model>     engines started (cold)         cold_s|<model>  their summed start seconds
    wake|<model>     engines woken from sleep       wake_s|<model>  their summed wake seconds
    pending|<model>  batch lines waiting (sample)   celery|<p>      `batch` messages of priority p
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

BUCKET_SECONDS = 10
KEEP_SECONDS = 2 * 3600
# Upper edges of the latency bins: 1 ms, 1.5 ms, 2.25 ms ... about 290 s; one more bin above.
EDGES = tuple(0.001 * 1.5**i for i in range(32))


def latency_bin(seconds: float) -> int:
    return bisect.bisect_left(EDGES, seconds)


def percentile(bins: dict[int, int], q: float) -> float | None:
    """The q-quantile of the values counted in `bins`, interpolated within its bin."""
    total = sum(bins.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(bins):
        count = bins[index]
        if count <= 0:
            continue
        if seen + count >= rank:
            if index >= len(EDGES):
                return EDGES[-1]
            low = EDGES[index - 1] if index > 0 else 0.0
            return low + (EDGES[index] - low) * max(0.0, rank - seen) / count
        seen += count
    return EDGES[-1]


class SeriesRecorder:
    """Counts of this process, written to the current bucket by `flush`."""

    def __init__(self, client: redis.Redis, prefix: str = "gw"):
        self.redis = client
        self.prefix = prefix
        self._counts: dict[tuple[str, str], int] = {}
        self._sampled_bucket: int | None = None

    def key(self, bucket: int) -> str:
        return f"{self.prefix}:series:{bucket}"

    # -- writing -----------------------------------------------------------------------------

    def request(self, model: str, seconds: float, ttft: float | None, status: int) -> None:
        """One realtime call answered (hot path: dict updates only)."""
        counts = self._counts
        key = ("n", model)
        counts[key] = counts.get(key, 0) + 1
        if status >= 500:
            key = ("e", model)
            counts[key] = counts.get(key, 0) + 1
        elif status < 400:
            key = ("lat", str(latency_bin(seconds)))
            counts[key] = counts.get(key, 0) + 1
            if ttft is not None:
                key = ("ttft", str(latency_bin(ttft)))
                counts[key] = counts.get(key, 0) + 1

    def flush(self, now: float | None = None,
              sample_queues: Callable[[], dict[str, int]] | None = None) -> None:
        """Write what was counted since the last flush; once a bucket, the queue depths that
        `sample_queues` returns ({"pending|<model>": n, "celery|<priority>": n, ...})."""
        try:
            self._flush(time.time() if now is None else now, sample_queues)
        except Exception:  # the usage reporter calls this: charts must never stop it
            log.exception("chart series not written")

    def _flush(self, now: float, sample_queues) -> None:
        bucket = int(now // BUCKET_SECONDS)
        counts, self._counts = self._counts, {}
        sample = sample_queues is not None and bucket != self._sampled_bucket
        if not counts and not sample:
            return
        key = self.key(bucket)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for (kind, name), value in counts.items():
                pipe.hincrby(key, f"{kind}|{name}", value)
            if counts:
                pipe.expire(key, KEEP_SECONDS)
            if sample:
                pipe.set(f"{key}:sampled", 1, nx=True, ex=KEEP_SECONDS)
            claimed = pipe.execute()[-1]
            if sample:
                self._sampled_bucket = bucket
                if claimed:
                    self._write_sample(key, sample_queues())
        except redis.RedisError as exc:
            log.warning("chart series not written, will retry: %s", exc)
            for name, value in counts.items():
                self._counts[name] = self._counts.get(name, 0) + value

    def _write_sample(self, key: str, depths: dict[str, int]) -> None:
        # An empty queue is a point at zero on the chart, not a gap.
        depths.setdefault("pending|", 0)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=depths)
        pipe.expire(key, KEEP_SECONDS)
        pipe.execute()

    def engine_started(self, model: str, kind: str, seconds: float,
                       now: float | None = None) -> None:
        """An engine became ready: kind "cold" (a start) or "wake" (from sleep). Written now."""
        now = time.time() if now is None else now
        key = self.key(int(now // BUCKET_SECONDS))
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(key, f"{kind}|{model}", 1)
            pipe.hincrbyfloat(key, f"{kind}_s|{model}", round(seconds, 3))
            pipe.expire(key, KEEP_SECONDS)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("chart series: start of %s not written: %s", model, exc)

    # -- reading -----------------------------------------------------------------------------

    def read(self, seconds: float = 3600, now: float | None = None) -> dict:
        """The last `seconds` as chart series, one point a bucket (None where nothing was seen).

        Rates are per second; the current bucket's rate is over the part of it gone by.
        """
        now = time.time() if now is None else now
        last = int(now // BUCKET_SECONDS)
        first = last - max(1, int(seconds // BUCKET_SECONDS)) + 1
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(first, last + 1):
            pipe.hgetall(self.key(bucket))
        rows = [{k.decode(): float(v) for k, v in raw.items()} for raw in pipe.execute()]
        points = len(rows)
        series: dict = {
            "bucket_seconds": BUCKET_SECONDS,
            "t": [(first + i) * BUCKET_SECONDS for i in range(points)],
            "rps": {}, "errors_per_s": [0.0] * points,
            "latency_p50": [None] * points, "latency_p95": [None] * points,
            "ttft_p50": [None] * points, "ttft_p95": [None] * points,
            "cold_starts": {}, "wake_ups": {}, "start_seconds": {},
            "pending": {}, "pending_total": [], "celery": {},
        }
        sampled: list[int] = []
        for i, row in enumerate(rows):
            span = BUCKET_SECONDS
            if first + i == last:
                span = max(1.0, now - last * BUCKET_SECONDS)
            lat: dict[int, int] = {}
            ttft: dict[int, int] = {}
            for field, value in row.items():
                kind, _, name = field.partition("|")
                if kind == "n":
                    _point(series["rps"], name, points)[i] = round(value / span, 3)
                elif kind == "e":
                    series["errors_per_s"][i] += round(value / span, 3)
                elif kind == "lat":
                    lat[int(name)] = int(value)
                elif kind == "ttft":
                    ttft[int(name)] = int(value)
                elif kind == "cold":
                    _point(series["cold_starts"], name, points)[i] = int(value)
                elif kind == "wake":
                    _point(series["wake_ups"], name, points)[i] = int(value)
                elif kind == "cold_s" and row.get(f"cold|{name}"):
                    _point(series["start_seconds"], name, points)[i] = round(
                        value / row[f"cold|{name}"], 2)
                elif kind == "pending":
                    if name:
                        _point(series["pending"], name, points)[i] = int(value)
                    else:  # the sample's marker: models absent from it had nothing waiting
                        sampled.append(i)
                elif kind == "celery":
                    _point(series["celery"], name, points)[i] = int(value)
            series["latency_p50"][i] = _rounded(percentile(lat, 0.5))
            series["latency_p95"][i] = _rounded(percentile(lat, 0.95))
            series["ttft_p50"][i] = _rounded(percentile(ttft, 0.5))
            series["ttft_p95"][i] = _rounded(percentile(ttft, 0.95))
        for name, values in series["rps"].items():
            # A model with no call in a bucket had a rate of zero, not an unknown one.
            series["rps"][name] = [v or 0.0 for v in values]
        for values in series["pending"].values():
            for i in sampled:
                if values[i] is None:
                    values[i] = 0
        series["pending_total"] = [None] * points
        for i in sampled:
            series["pending_total"][i] = sum(v[i] for v in series["pending"].values())
        for group in ("cold_starts", "wake_ups"):
            for name, values in series[group].items():
                series[group][name] = [v or 0 for v in values]
        return series


def _point(group: dict[str, list], name: str, points: int) -> list:
    values = group.get(name)
    if values is None:
        values = group[name] = [None] * points
    return values


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
