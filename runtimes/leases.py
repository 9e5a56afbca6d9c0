"""Counted leases in Redis: at most N holders of a named slot across every process.

A lease is a member of a sorted set scored by its expiry. Each process that takes leases keeps a
heartbeat key alive (refreshed every few seconds by a background thread, a greenlet under
gevent); taking a lease first drops the leases of holders whose heartbeat is gone. So a process
killed with SIGKILL gives its slots back within seconds, while a lease held by a live process
for a long call (a slow engine answer) stays until it is released or its own expiry.
Used for per-key concurrency limits and for the batch admission cap per model.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import redis

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0

# KEYS[1] = lease set; ARGV = now, expiry, limit, lease id, heartbeat key prefix.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  -- Full: before refusing, give back the slots of holders that are gone (only then, so the
  -- common case stays one sorted-set update).
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local holder = string.match(member, '^(.*)|')
    if holder and redis.call('EXISTS', ARGV[5] .. holder) == 0 then
      redis.call('ZREM', KEYS[1], member)
    end
  end
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
end
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
        self._heartbeat_prefix = f"{prefix}:holder:"
        self._beating_pid: int | None = None

    @property
    def holder(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self, name: str, limit: int) -> str | None:
        """A lease id, or None when `limit` leases are already held."""
        self._ensure_heartbeat()
        lease = f"{self.holder}|{uuid.uuid4().hex}"
        now = time.time()
        admitted = self._acquire(keys=[f"{self.prefix}:{name}"],
                                 args=[now, now + self.lease_seconds, limit, lease,
                                       self._heartbeat_prefix])
        return lease if admitted else None

    def release(self, name: str, lease: str) -> None:
        self.redis.zrem(f"{self.prefix}:{name}", lease)

    def held(self, name: str) -> int:
        key = f"{self.prefix}:{name}"
        self.redis.zremrangebyscore(key, "-inf", time.time())
        return int(self.redis.zcard(key))

    def _beat(self) -> None:
        self.redis.set(self._heartbeat_prefix + self.holder, "1",
                       px=int(HEARTBEAT_SECONDS * 3 * 1000))

    def _ensure_heartbeat(self) -> None:
        # One heartbeat per process, started where leases are taken: never before a fork.
        if self._beating_pid == os.getpid():
            return
        self._beating_pid = os.getpid()
        self._beat()
        threading.Thread(target=self._keep_beating, name="lease-heartbeat", daemon=True).start()

    def _keep_beating(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("lease heartbeat failed, will retry: %s", exc)
