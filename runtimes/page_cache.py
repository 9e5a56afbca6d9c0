"""Model weights in RAM: page-cache statistics and priming, measured by workers, read by the web.

`PageCache` measures how much of a cached model's weights is in the kernel's page cache
(`runtimes.storage.residency`, `mincore`) and reads them in ahead of a start (`prime`, bounded
by `PRIME_BUDGET_GB`). The figures are kept in Redis:

- `measure` (as a start begins) and an operator's priming remember the residency a first start
  will find: `scale_cold_estimate` turns it into a shorter first-start estimate (a cold call's
  Retry-After), with the disk read rate a large priming measured (`read_rate`);
- `note_residency` (after a download or a priming, and `refresh_residency` on the autoscaler's
  tick) keeps the last figure of each repo for the cache and prime views (`seen_residency`).

Page-cache statistics are measured by the workers and read back by the web app: a `mincore`
over gigabytes of weights has no place in a web worker's request.

Its Redis keys, under `{prefix}:weights:`: `residency:`, `prime:`, `prime_requested:` and
`prime_lock:` per repo and revision, `residency_seen:` per repo, `residency_refresh` and
`read_rate`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import redis

from runtimes.catalog import ModelSpec
from runtimes.downloads import QUEUED
from runtimes.storage import GB, Residency, StorageError, prime, residency
from runtimes.weight_cache import NotCached, WeightCache

log = logging.getLogger(__name__)

PRIME_LOCK_SECONDS = 3600
# How often the workers measure the page-cache residency of the cached models (for the web).
RESIDENCY_REFRESH_SECONDS = 60
# Assumed disk read rate until a priming has measured one.
DEFAULT_READ_BYTES_PER_SECOND = 1 * GB
# Even with every weight in RAM an engine still allocates its KV cache, compiles and captures
# CUDA graphs: a first-start estimate never drops below this share of the catalog's figure.
MIN_ESTIMATE_SHARE = 0.25
# How long a measured figure is kept.
KEEP_SECONDS = 7 * 24 * 3600


def cold_start_estimate(base_seconds: float, weight_bytes: int, resident_fraction: float,
                        read_bytes_per_second: float) -> float:
    """A first start's estimate given where the weights are.

    `base_seconds` (the catalog's figure) is taken to include reading every weight from disk;
    bytes already in the page cache skip that read.
    """
    saved = weight_bytes * max(0.0, min(1.0, resident_fraction)) / read_bytes_per_second
    return max(base_seconds * MIN_ESTIMATE_SHARE, base_seconds - saved)


class PageCache:
    def __init__(self, client: redis.Redis, disk: WeightCache, budget_bytes: int,
                 prefix: str = "gw"):
        self.redis = client
        self.disk = disk
        self.budget_bytes = budget_bytes  # 0: never prime
        self._prefix = f"{prefix}:weights"

    def _key(self, kind: str, spec: ModelSpec) -> str:
        return f"{self._prefix}:{kind}:{spec.repo_id}@{spec.revision or 'main'}"

    def _seen_key(self, repo_id: str) -> str:
        return f"{self._prefix}:residency_seen:{repo_id}"

    # -- residency -------------------------------------------------------------------------------

    def measure(self, spec: ModelSpec) -> Residency | None:
        """How much of `spec`'s weights is in RAM now (and remember it for estimates)."""
        files = self.disk.cache(spec).weight_files(spec.revision)
        if not files:
            return None
        found = residency(files)
        self.redis.set(self._key("residency", spec), json.dumps(
            {**found.describe(), "measured_at": time.time()}), ex=KEEP_SECONDS)
        return found

    def note_residency(self, spec: ModelSpec) -> dict | None:
        """Measure how much of `spec`'s weights is in RAM and keep it for the web to show."""
        files = self.disk.cache(spec).weight_files(spec.revision)
        found = _residency_or_none(files)
        if found is not None:
            self.redis.set(self._seen_key(spec.repo_id),
                           json.dumps({**found, "measured_at": time.time()}), ex=KEEP_SECONDS)
        return found

    def seen_residency(self, repo_id: str) -> dict | None:
        """The last measured residency of a repo's weights (None: not measured lately)."""
        raw = self.redis.get(self._seen_key(repo_id))
        return json.loads(raw) if raw else None

    def refresh_residency(self) -> None:
        """Measure every cached model of the catalog (one per repo), at most every
        RESIDENCY_REFRESH_SECONDS whoever asks."""
        if not self.redis.set(f"{self._prefix}:residency_refresh", "1", nx=True,
                              ex=RESIDENCY_REFRESH_SECONDS):
            return
        seen: set[str] = set()
        for spec in self.disk.catalog:
            if spec.repo_id not in seen and self.disk.is_local(spec):
                seen.add(spec.repo_id)
                self.note_residency(spec)

    def remembered_residency(self, spec: ModelSpec) -> dict | None:
        raw = self.redis.get(self._key("residency", spec))
        return json.loads(raw) if raw else None

    # -- priming ---------------------------------------------------------------------------------

    def prime_state(self, spec: ModelSpec) -> dict | None:
        raw = self.redis.get(self._key("prime", spec))
        return json.loads(raw) if raw else None

    def _set_prime_state(self, spec: ModelSpec, **fields) -> dict:
        state = {**(self.prime_state(spec) or {}), **fields, "model": spec.id,
                 "repo_id": spec.repo_id, "updated_at": time.time()}
        self.redis.set(self._key("prime", spec), json.dumps(state), ex=KEEP_SECONDS)
        return state

    def ask_prime(self, spec: ModelSpec, enqueue: Callable[[str], None]) -> tuple[dict, bool]:
        if not self.disk.is_local(spec):
            raise NotCached(f"the weights of {spec.id} ({spec.repo_id}) are not in the cache; "
                            f"download them first")
        if not self.redis.set(self._key("prime_requested", spec), "1", nx=True,
                              ex=PRIME_LOCK_SECONDS):
            return self.prime_state(spec) or {"status": QUEUED}, False
        state = self._set_prime_state(spec, status=QUEUED, requested_at=time.time(), error=None)
        enqueue(spec.id)
        return state, True

    def prime(self, model: str, record_residency: bool = True) -> dict:
        """Read `model`'s weights into the page cache within the budget; return the report.

        `record_residency` (an operator's priming ahead of time) makes the result the input of
        the next first-start estimate; a priming that runs while the engine starts must not.
        """
        spec = self.disk.spec(model)
        lock = self.redis.lock(self._key("prime_lock", spec), timeout=PRIME_LOCK_SECONDS)
        if not lock.acquire(blocking=False):
            # Another priming (a start's) is at it; its state is this one's answer.
            self.redis.delete(self._key("prime_requested", spec))
            return self.prime_state(spec) or {"status": "priming"}
        try:
            files = self.disk.cache(spec).weight_files(spec.revision)
            if not files:
                raise NotCached(f"no weight files of {spec.id} in the cache")
            self._set_prime_state(spec, status="priming", started_at=time.time(), error=None)
            report = prime(files, self.budget_bytes)
            if report.read_bytes >= 256 * 1024 * 1024 and report.seconds > 0:
                # Large reads measure the disk; small ones mostly measure the call overhead.
                rate = report.read_bytes / report.seconds
                self.redis.set(f"{self._prefix}:read_rate", f"{rate:.0f}")
            if record_residency:
                self.redis.set(self._key("residency", spec), json.dumps(
                    {**report.after.describe(), "measured_at": time.time()}), ex=KEEP_SECONDS)
            self.redis.set(self._seen_key(spec.repo_id), json.dumps(
                {**report.after.describe(), "measured_at": time.time()}), ex=KEEP_SECONDS)
            log.info("primed %s: %.2f GB read in %.2f s (%.2f GB/s), %.0f%% resident",
                     spec.id, report.read_bytes / GB, report.seconds, report.gb_per_second,
                     report.after.fraction * 100)
            return self._set_prime_state(spec, status="done", finished_at=time.time(),
                                         **report.describe())
        except (OSError, StorageError) as exc:
            self._set_prime_state(spec, status="failed", error=str(exc), finished_at=time.time())
            raise
        finally:
            self.redis.delete(self._key("prime_requested", spec))
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass

    # -- the first-start estimate ----------------------------------------------------------------

    def read_rate(self) -> float:
        """The disk read rate (bytes per second) the last large priming measured."""
        raw = self.redis.get(f"{self._prefix}:read_rate")
        return float(raw) if raw else DEFAULT_READ_BYTES_PER_SECOND

    def scale_cold_estimate(self, spec: ModelSpec, base_seconds: float) -> float:
        """The first-start estimate of `spec`, shorter when its weights are known to be in RAM."""
        if not spec.download_weights:
            return base_seconds
        known = self.remembered_residency(spec)
        if not known:
            return base_seconds
        return cold_start_estimate(base_seconds, known["weight_bytes"],
                                   known["resident_fraction"], self.read_rate())


def _residency_or_none(files) -> dict | None:
    try:
        return residency(files).describe() if files else None
    except (OSError, StorageError):
        return None  # a file went meanwhile, or no mincore here
