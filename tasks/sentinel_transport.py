"""kombu's Redis Sentinel transport, made safe to close while the master is failing over.

When the master dies under a gevent batch worker, several greenlets see the connection drop at
once. One closes the broker connection (kombu then drops the transport's `client`); another,
closing its channel, tries to give its unacknowledged messages back, which needs a new pool,
whose parameters kombu reads from that `client`: an AttributeError, which Celery takes for an
unrecoverable error, and the worker exits. (kombu 5.7; seen in
tests/webapp/test_sentinel_failover.py.) Here the same moment is a broker connection error,
which kombu ignores while closing: the messages stay in the `unacked` hash and come back after
the visibility timeout, as after a killed worker.

kombu resolves `sentinel://` through its alias table, also when it switches between the
alternates of a Sentinel URL, so `use_safe_sentinel_transport` points the alias here.
"""

from __future__ import annotations

import redis
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

ALIAS = "sentinel"


class SentinelChannel(kombu_redis.SentinelChannel):
    def _connparams(self, asynchronous: bool = False):
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def use_safe_sentinel_transport() -> None:
    """Make `sentinel://` broker URLs use `SentinelTransport` in this process."""
    kombu_transport.TRANSPORT_ALIASES[ALIAS] = f"{__name__}:{SentinelTransport.__name__}"
