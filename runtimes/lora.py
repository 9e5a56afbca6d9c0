"""LoRA adapters loaded on demand into the engines of their base model.

An adapter of the catalog (`AdapterSpec`) is served by an engine of its base: the first call for
it on an engine loads it there (vLLM's `POST /v1/load_lora_adapter`, SGLang's
`/load_lora_adapter`), and each engine keeps at most its base's `max_loras` adapters loaded; the
least recently used is unloaded to make room. What is loaded where lives in Redis, one sorted set
per engine instance (the registry's `lora:<instance>`: adapter id -> last use), so every web
worker and batch worker sees the same picture, and a lock per instance makes one of them do each
load while the others wait for it. The registry drops an instance's set with its record; an
engine that lost its adapters anyway (it restarted, or another client unloaded them) answers "not
found" for one we thought loaded, and that call loads it again (`reload`).

Plain Redis and HTTP, no Flask: the realtime API and batch workers use it alike.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

import redis
import urllib3

from runtimes.catalog import AdapterSpec, ModelSpec
from runtimes.engines import engine_for
from runtimes.registry import RuntimeRecord, RuntimeRegistry

log = logging.getLogger(__name__)

LOCK_SECONDS = 120  # a load of a big adapter from disk; the lock expires if its holder dies
TOUCH_EVERY_SECONDS = 1.0  # a worker refreshes an adapter's last use at most this often


class AdapterLoadError(Exception):
    """The adapter could not be loaded: the engine refused it or did not answer (502), or
    another worker's load of it is taking too long (503)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


def adapter_source(adapter: AdapterSpec) -> str:
    """What the engine is given as `lora_path`: a local directory, or the Hub repo id, which
    vLLM resolves in its HF cache (`HF_HOME`, where our downloads put it)."""
    return adapter.path or adapter.repo_id


class AdapterLoader:
    def __init__(self, registry: RuntimeRegistry, timeout: float = 120.0):
        self.registry = registry
        self.redis = registry.redis
        self.timeout = timeout
        self._pool = urllib3.PoolManager(num_pools=32, maxsize=4, retries=False)
        self._touched: dict[tuple[str, str], float] = {}

    def loaded_on(self, records: Iterable[RuntimeRecord], adapter_id: str) -> set[str]:
        """The ids of `records` that have `adapter_id` loaded (one round trip)."""
        records = list(records)
        if not records:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            pipe.zscore(self._key(record.id), adapter_id)
        return {r.id for r, score in zip(records, pipe.execute(), strict=True)
                if score is not None}

    def loaded(self, instance_id: str) -> list[str]:
        """The adapters loaded on an instance, least recently used first."""
        return [m.decode() for m in self.redis.zrange(self._key(instance_id), 0, -1)]

    def ensure(self, record: RuntimeRecord, base: ModelSpec, adapter: AdapterSpec,
               known_loaded: bool = False) -> None:
        """Make `adapter` loaded on the instance `record` (of `base`), unloading the least
        recently used adapter first when the engine holds `max_loras` already."""
        key = self._key(record.id)
        now = time.time()
        if known_loaded or self.redis.zscore(key, adapter.id) is not None:
            self._touch(key, record.id, adapter.id, now)
            return
        try:
            with self.redis.lock(key + ":lock", timeout=LOCK_SECONDS,
                                 blocking_timeout=self.timeout):
                self._load_locked(key, record, base, adapter, now)
        except redis.exceptions.LockError:
            raise AdapterLoadError(f"The adapter '{adapter.id}' is still being loaded.",
                                   status=503) from None

    def _load_locked(self, key: str, record: RuntimeRecord, base: ModelSpec,
                     adapter: AdapterSpec, now: float) -> None:
        if self.redis.zscore(key, adapter.id) is not None:  # another worker loaded it
            return
        loaded = self.redis.zrange(key, 0, -1)  # least recently used first
        room = engine_for(base).max_loras(base)
        for victim in loaded[:max(0, len(loaded) - room + 1)]:
            self._unload(record, base, victim.decode())
            self.redis.zrem(key, victim)
        self._load(record, base, adapter)
        self.redis.zadd(key, {adapter.id: now})

    def reload(self, record: RuntimeRecord, base: ModelSpec, adapter: AdapterSpec) -> None:
        """The engine does not know an adapter we thought loaded (it restarted): load again."""
        self.forget(record, adapter)
        self.ensure(record, base, adapter)

    def forget(self, record: RuntimeRecord, adapter: AdapterSpec) -> None:
        """The engine does not have `adapter` (whatever we noted): the next use loads it."""
        self.redis.zrem(self._key(record.id), adapter.id)
        self._touched.pop((record.id, adapter.id), None)

    def _key(self, instance_id: str) -> str:
        return self.registry.key("lora", instance_id)

    def _touch(self, key: str, instance_id: str, adapter_id: str, now: float) -> None:
        if now - self._touched.get((instance_id, adapter_id), 0.0) < TOUCH_EVERY_SECONDS:
            return
        self._touched[(instance_id, adapter_id)] = now
        self.redis.zadd(key, {adapter_id: now}, xx=True)

    def _post(self, record: RuntimeRecord, route: str, body: dict) -> tuple[int, str]:
        try:
            answer = self._pool.request(
                "POST", f"{record.endpoint}{route}", body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"}, timeout=self.timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise AdapterLoadError(f"the engine did not answer: {type(exc).__name__}") from None
        return answer.status, answer.data.decode(errors="replace")[:500]

    def _load(self, record: RuntimeRecord, base: ModelSpec, adapter: AdapterSpec) -> None:
        route = engine_for(base).lora_routes[0]
        status, text = self._post(record, route, {"lora_name": adapter.id,
                                                  "lora_path": adapter_source(adapter)})
        if status == 200 or (status == 400 and "already been loaded" in text):
            log.info("adapter %s loaded on %s", adapter.id, record.id)
            return
        log.warning("adapter %s: the engine of %s answered %d to its load", adapter.id,
                    record.id, status)
        # Whatever vLLM answers (404: no adapter at that path; 500: a rank over the engine's
        # limit, or no tensors), the catalog's adapter cannot be served: the operator's
        # problem, not the caller's, so a 502 that says why.
        raise AdapterLoadError(
            f"The engine could not load the adapter '{adapter.id}': {_reason(text)}")

    def _unload(self, record: RuntimeRecord, base: ModelSpec, adapter_id: str) -> None:
        route = engine_for(base).lora_routes[1]
        status, _ = self._post(record, route, {"lora_name": adapter_id})
        # 404/400: the engine no longer has it (it restarted), which is what we wanted.
        log.info("adapter %s unloaded from %s (%d)", adapter_id, record.id, status)


def _reason(text: str) -> str:
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip() or "no explanation"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(parsed.get("detail"), str):
            return parsed["detail"]
    return text.strip()
