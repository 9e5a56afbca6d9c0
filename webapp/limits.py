"""Per-key request rate and concurrency limits, shared by every web worker through Redis.

Only keys that carry a limit pay for it: one Redis round trip per request for a
requests-per-minute limit, one more at the end for a concurrency limit (counted as leases, so a
worker that dies mid-request cannot leave a key blocked).
"""

from __future__ import annotations

import math
import time

import redis

from runtimes.leases import LeaseSet


class LimitExceeded(Exception):
    def __init__(self, kind: str, retry_after: int):
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


class KeyLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "limits", lease_seconds: float = 900):
        self.redis = client
        self.prefix = prefix
        self._leases = LeaseSet(client, f"{prefix}:conc", lease_seconds)

    def check_rate(self, key_name: str, per_minute: int, now: float | None = None) -> None:
        """Count one request in the current minute; raise LimitExceeded past the limit."""
        now = time.time() if now is None else now
        window = int(now // 60)
        counter = f"{self.prefix}:rpm:{key_name}:{window}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count, _ = pipe.execute()
        if count > per_minute:
            raise LimitExceeded("requests_per_minute", max(1, math.ceil((window + 1) * 60 - now)))

    def acquire(self, key_name: str, limit: int) -> str:
        """Take a concurrency lease; raise LimitExceeded when `limit` are already held."""
        lease = self._leases.acquire(key_name, limit)
        if lease is None:
            raise LimitExceeded("max_concurrency", 1)
        return lease

    def release(self, key_name: str, lease: str) -> None:
        self._leases.release(key_name, lease)
