"""Counted leases in Redis: at most N holders of a named slot across every process.

A lease is a member of a sorted set scored by its expiry. Each process that takes leases keeps a
heartbeat key alive (refreshed every few seconds by a background thread, a greenlet under
gevent); taking a lease first drops the leases of holders whose heartbeat is gone. So a process
killed with SIGKILL gives its slots back within seconds, while a lease held by a live process
for a long call (a slow engine answer) stays until it is released or its own expiry. A release
that finds Redis away (restarting, or failing over to a replica) is done again on the next
heartbeat, so the slot comes back seconds after Redis does, not at the lease's expiry.
Used for per-key concurrency limits and for the batch admission cap per model.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

import redis

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0

# KEYS = lease set, the set of holders kept waiting; ARGV = now, expiry, limit, heartbeat key
# prefix, holder, lease ids... Grants as many of the lease ids (in order) as the limit leaves
# room for and returns how many; a holder granted fewer than it asked for is noted as waiting.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local wanted = #ARGV - 5
local limit = tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) + wanted > limit then
  -- Short of room: before granting fewer, give back the slots of holders that are gone (only
  -- then, so the common case stays one sorted-set update).
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local holder = string.match(member, '^(.*)|')
    if holder and redis.call('EXISTS', ARGV[4] .. holder) == 0 then
      redis.call('ZREM', KEYS[1], member)
    end
  end
end
local granted = math.min(wanted, limit - redis.call('ZCARD', KEYS[1]))
for i = 1, granted do
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[5 + i])
end
if granted > 0 then
  redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 60)
end
if granted < wanted then
  redis.call('ZADD', KEYS[2], ARGV[1] + 2, ARGV[5])
  redis.call('EXPIRE', KEYS[2], 60)
else
  redis.call('ZREM', KEYS[2], ARGV[5])
end
return math.max(granted, 0)
"""

# KEYS = lease set, the set of holders kept waiting; ARGV = now, expiry, holder, whether it has
# callers waiting ("1"/"0"), lease ids... Pushes the expiry of the given leases that are still
# held; returns {leases held in all, other holders waiting, the given leases no longer held...}.
_REFRESH = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], ARGV[1] + 2, ARGV[3])
  redis.call('EXPIRE', KEYS[2], 60)
end
local others = redis.call('ZCARD', KEYS[2])
if redis.call('ZSCORE', KEYS[2], ARGV[3]) then others = others - 1 end
local lost = {}
for i = 5, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    table.insert(lost, ARGV[i])
  end
end
if #ARGV > 4 then
  redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 60)
end
return {redis.call('ZCARD', KEYS[1]), others, unpack(lost)}
"""


class LeaseSet:
    def __init__(self, client: redis.Redis, prefix: str, lease_seconds: float = 900):
        self.redis = client
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)
        self._heartbeat_prefix = f"{prefix}:holder:"
        self._beating_pid: int | None = None
        # Releases that failed, to do again on the next heartbeat: (name, lease ids).
        self._unreleased: list[tuple[str, tuple[str, ...]]] = []
        self._unreleased_lock = threading.Lock()

    @property
    def holder(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self, name: str, limit: int) -> str | None:
        """A lease id, or None when `limit` leases are already held."""
        leases = self.acquire_many(name, limit, 1)
        return leases[0] if leases else None

    def acquire_many(self, name: str, limit: int, count: int) -> list[str]:
        """Up to `count` lease ids in one round trip: as many as `limit` leaves room for."""
        self._ensure_heartbeat()
        holder = self.holder
        leases = [f"{holder}|{secrets.token_hex(12)}" for _ in range(count)]
        now = time.time()
        granted = self._acquire(keys=[f"{self.prefix}:{name}", f"{self.prefix}:{name}:wanting"],
                                args=[now, now + self.lease_seconds, limit,
                                      self._heartbeat_prefix, holder, *leases])
        return leases[:int(granted)]

    def release(self, name: str, *leases: str) -> None:
        """Give `leases` back; when Redis cannot be reached, on a later heartbeat."""
        if not leases:
            return
        try:
            self.redis.zrem(f"{self.prefix}:{name}", *leases)
        except redis.RedisError as exc:
            log.warning("lease release failed, will retry: %s", exc)
            with self._unreleased_lock:
                self._unreleased.append((name, leases))

    def _release_again(self) -> None:
        with self._unreleased_lock:
            pending, self._unreleased = self._unreleased, []
        for name, leases in pending:
            self.release(name, *leases)

    def refresh(self, name: str, leases: list[str],
                waiting: bool = False) -> tuple[int, set[str], int]:
        """Push back the expiry of `leases`, which this process keeps handing on, and note
        whether callers here wait for more. Return how many leases of `name` are held in all
        (every process), which of `leases` were lost (their expiry passed, or this holder's
        heartbeat lapsed and another gave them back), and how many other holders were refused
        a lease of `name`, or said they wait, in the last 2 s."""
        now = time.time()
        reply = self._refresh(keys=[f"{self.prefix}:{name}", f"{self.prefix}:{name}:wanting"],
                              args=[now, now + self.lease_seconds, self.holder,
                                    "1" if waiting else "0", *leases])
        lost = {lease.decode() if isinstance(lease, bytes) else lease for lease in reply[2:]}
        return int(reply[0]), lost, int(reply[1])

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
                continue
            self._release_again()
