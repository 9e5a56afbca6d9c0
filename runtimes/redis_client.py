"""The one way every process connects to Redis: one server, or the master its Sentinels name.

With a Sentinel URL (config.redis_url) the client asks the Sentinels for the master before each
new connection, and drops connections to a master that was demoted or died, so after a failover
the next command reaches the new master. Commands in flight when the master dies fail with
`redis.ConnectionError` (after redis-py's few retries): callers retry, or answer 503.

Lua scripts need nothing here: the script cache is not replicated, and redis-py's `Script`
(from `register_script`) loads its script again when the new master answers NOSCRIPT, also in a
pipeline. No code keeps a SHA of its own.
"""

from __future__ import annotations

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from config.settings import Settings

# Short for the Sentinels: a dead one is skipped quickly for the next.
SENTINEL_TIMEOUT = 1.0
CONNECT_TIMEOUT = 5.0
# How long a caller waits for a free connection when all are busy.
POOL_WAIT_SECONDS = 30


class BlockingSentinelConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool with the blocking pool's waiting: the master's address comes from the
    Sentinels (SentinelConnectionPool), and a caller finding every connection busy waits its turn
    (BlockingConnectionPool) instead of failing with "Too many connections"."""


def make_redis(settings: Settings) -> redis.Redis:
    options = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": settings.redis_socket_timeout,
        "health_check_interval": 30,
    }
    sentinel = settings.redis_sentinel
    if sentinel is None:
        # A blocking pool: when every connection is busy (hundreds of batch lines or streams in
        # one gevent worker), a caller waits its turn instead of failing.
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections,
            timeout=POOL_WAIT_SECONDS, **options,
        )
        return redis.Redis(connection_pool=pool)
    sentinels = Sentinel(
        list(sentinel.sentinels),
        sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT,
                         "socket_connect_timeout": SENTINEL_TIMEOUT},
    )
    return sentinels.master_for(
        settings.redis_sentinel_master,
        connection_pool_class=BlockingSentinelConnectionPool,
        db=sentinel.db, username=sentinel.username, password=sentinel.password,
        max_connections=settings.redis_max_connections, timeout=POOL_WAIT_SECONDS, **options,
    )
