"""Asking for an engine start, once until that start is done.

However many callers in however many processes ask at once (cold calls, the autoscaler's tick, a
finished download), one start message is sent: a `SET NX` claim in the registry, released when
the start task ends or after `dedupe_seconds`. The control plane itself also refuses to start a
second instance.
"""

from __future__ import annotations

from collections.abc import Callable

from runtimes.registry import RuntimeRegistry


def start_requester(registry: RuntimeRegistry, send_start: Callable[[str, int], None],
                    dedupe_seconds: float = 30.0) -> Callable[..., None]:
    def request_start(model: str, replicas: int = 1) -> None:
        if registry.claim_start_request(model, dedupe_seconds):
            send_start(model, replicas)

    return request_start
