"""Counted leases in Redis: at most N holders of a named slot across every process.

A lease is a member of a sorted set scored by its expiry, so a process that dies while holding
one cannot block the slot for good: its lease lapses after `lease_seconds`. Used for per-key
concurrency limits and for the batch admission cap per model.
"""

from __future__ import annotations

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


class LeaseSet:
    def __init__(self, client: redis.Redis, prefix: str, lease_seconds: float = 900):
        self.redis = client
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, name: str, limit: int) -> str | None:
        """A lease id, or None when `limit` leases are already held."""
        lease = uuid.uuid4().hex
        now = time.time()
        admitted = self._acquire(keys=[f"{self.prefix}:{name}"],
                                 args=[now, now + self.lease_seconds, limit, lease])
        return lease if admitted else None

    def release(self, name: str, lease: str) -> None:
        self.redis.zrem(f"{self.prefix}:{name}", lease)

    def held(self, name: str) -> int:
        key = f"{self.prefix}:{name}"
        self.redis.zremrangebyscore(key, "-inf", time.time())
        return int(self.redis.zcard(key))
