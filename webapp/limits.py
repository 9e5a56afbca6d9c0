"""Per-key request rate and concurrency limits, shared by every web worker through Redis.

Only keys that carry a limit pay for it: one Redis round trip per request for a
requests-per-minute limit, one more at the end for a concurrency limit. Concurrency is counted
as leases in a sorted set scored by their expiry, so a worker that dies mid-request cannot leave a
key blocked: its leases lapse after `lease_seconds`.
"""

from __future__ import annotations

import math
import time
import uuid

import redis

# KEYS[1] = lease set; ARGV = now, expiry, limit, lease id. Returns 1 when admitted.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 60)
return 1
"""


class LimitExceeded(Exception):
    def __init__(self, kind: str, retry_after: int):
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


class KeyLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "limits", lease_seconds: float = 900):
        self.redis = client
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self._acquire = client.register_script(_ACQUIRE)

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
        lease = uuid.uuid4().hex
        now = time.time()
        admitted = self._acquire(
            keys=[f"{self.prefix}:conc:{key_name}"],
            args=[now, now + self.lease_seconds, limit, lease],
        )
        if not admitted:
            raise LimitExceeded("max_concurrency", 1)
        return lease

    def release(self, key_name: str, lease: str) -> None:
        self.redis.zrem(f"{self.prefix}:conc:{key_name}", lease)
