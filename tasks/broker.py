"""What the Celery broker holds in Redis, and how API priorities map onto its priorities.

The only code that knows kombu's Redis layout: one list per queue and priority step (the
queue's name for step 0, else `<queue><sep><step>`, kombu.transport.redis.Channel._q_for_pri,
under `global_keyprefix`) and the `unacked` hash of messages delivered but not acknowledged.
The dashboard, the chart series and `/metrics` read queue depths through `BrokerStats`.
"""

from __future__ import annotations

import redis

BATCH_QUEUE = "batch"
QUEUES = ("batch", "control", "downloads")


def celery_priority(priority: int) -> int:
    """The Redis transport's priority (0 first) of the API's 0-9 (9 first)."""
    return 9 - max(0, min(9, priority))


def api_priority(celery: int) -> int:
    """The API's 0-9 (larger sooner) of a Celery priority (smaller sooner)."""
    return 9 - celery


class BrokerStats:
    def __init__(self, client: redis.Redis, transport_options: dict):
        self.redis = client
        self.options = dict(transport_options or {})

    def queue_keys(self, queue: str) -> list[tuple[int, str]]:
        """(Celery priority, Redis list) of each priority step of `queue`."""
        steps = self.options.get("priority_steps") or [0, 3, 6, 9]
        sep = self.options.get("sep", "\x06\x16")
        prefix = self.options.get("global_keyprefix", "")
        return [(step, f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}")
                for step in steps]

    def queue_lengths(self) -> dict[str, dict[int, int]]:
        """Messages waiting per queue and per Celery priority step."""
        plan = [(queue, step, key) for queue in QUEUES for step, key in self.queue_keys(queue)]
        pipe = self.redis.pipeline(transaction=False)
        for _, _, key in plan:
            pipe.llen(key)
        lengths: dict[str, dict[int, int]] = {queue: {} for queue in QUEUES}
        for (queue, step, _), length in zip(plan, pipe.execute(), strict=True):
            lengths[queue][step] = int(length)
        return lengths

    def batch_by_priority(self) -> dict[int, int]:
        """`batch` messages waiting per API priority."""
        return {api_priority(step): n for step, n in self.queue_lengths()[BATCH_QUEUE].items()}

    def unacked(self) -> int:
        """Messages delivered to a worker and not yet acknowledged (running, or held back with
        a countdown)."""
        return int(self.redis.hlen(f"{self.options.get('global_keyprefix', '')}unacked"))
