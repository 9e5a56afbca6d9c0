"""Which engine instance serves a call: the ready instances of a model, fewest calls in flight
(for a LoRA adapter, first those that have it loaded).

Each web worker (and batch worker) keeps the registry's records for `cache_seconds` (0.5 s by
default), so the proxy's hot path makes no Redis round trip; a call that finds its engine gone
invalidates the cache and looks again.
"""

from __future__ import annotations

import time

from runtimes.catalog import ModelCatalog
from runtimes.registry import READY, RuntimeRecord, RuntimeRegistry
from runtimes.upstreams import health as upstream_health
from runtimes.upstreams import upstream_record


class RuntimeRouter:
    def __init__(self, registry: RuntimeRegistry, cache_seconds: float = 0.5,
                 catalog: ModelCatalog | None = None):
        self.registry = registry
        self.cache_seconds = cache_seconds
        # The catalog's upstreams: one fixed record each, handed out while healthy.
        self._upstreams = {spec.id: spec for spec in (catalog or ()) if spec.upstream_url}
        self._ready: dict[str, list[RuntimeRecord]] = {}
        self._expires = 0.0

    def _refresh(self) -> None:
        ready: dict[str, list[RuntimeRecord]] = {}
        for record in self.registry.all():
            if record.state == READY and record.port:
                ready.setdefault(record.model, []).append(record)
        if self._upstreams:
            checked = upstream_health(self.registry)
            for model, spec in self._upstreams.items():
                if checked.get(model, {}).get("ok", True):  # not checked yet: try it
                    ready[model] = [upstream_record(spec)]
        self._ready = ready
        self._expires = time.monotonic() + self.cache_seconds

    def ready(self, model: str) -> list[RuntimeRecord]:
        if time.monotonic() >= self._expires:
            self._refresh()
        return self._ready.get(model, [])

    def pick(self, model: str, inflight: dict[str, int],
             prefer: set[str] | None = None) -> RuntimeRecord | None:
        """The least loaded ready instance; among the ids in `prefer` if any is ready (a LoRA
        adapter's affinity: the replicas that have it loaded already)."""
        candidates = self.ready(model)
        if not candidates:
            return None
        if prefer:
            candidates = [r for r in candidates if r.id in prefer] or candidates
        if len(candidates) == 1:
            return candidates[0]
        return min(candidates, key=lambda r: inflight.get(r.id, 0))

    def invalidate(self) -> None:
        self._expires = 0.0
