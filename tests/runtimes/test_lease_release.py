"""A lease released while Redis is away (a restart, a failover) comes back once Redis does, on
the next heartbeat, instead of holding its slot until the lease's expiry (15 minutes)."""

from __future__ import annotations

import redis

from runtimes.leases import HEARTBEAT_SECONDS, LeaseSet
from tests.harness import RedisServer, wait_for


def test_a_release_that_finds_redis_away_is_done_when_it_is_back(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        client = redis.Redis.from_url(f"{server.url}/0", socket_connect_timeout=1)
        leases = LeaseSet(client, "test:release")
        lease = leases.acquire("key", 1)
        assert lease and leases.acquire("key", 1) is None

        server.stop()  # SIGTERM: the AOF keeps the lease, as a replica would
        leases.release("key", lease)  # no error for the caller: it is kept for later
        server.start()  # same port, same AOF

        wait_for(lambda: leases.held("key") == 0, HEARTBEAT_SECONDS * 4, interval=0.1,
                 what="the lease given back after Redis came back")
        assert leases.acquire("key", 1)
    finally:
        server.stop()
