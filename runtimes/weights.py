"""A model's weights as the control plane sees them: on disk or not, downloading, in RAM or not.

`ModelWeights` joins the catalog, the cache on disk (`runtimes.storage`), the downloads
(`runtimes.downloads`) and the page cache:

- `prepare_for_start(spec)` is the control plane's step before it claims GPUs for a start. A
  model whose engine loads weights (`download_weights` in the catalog) and whose snapshot is not
  complete gets a download requested instead of a start; the start comes on a later tick, once
  the download task has finished (it asks for the start itself when a caller is waiting). A
  model that is local starts at once, and its weights are read into the page cache while the
  engine starts (`prime`, bounded by `PRIME_BUDGET_GB`).
- `download_wait_seconds` and `scale_cold_estimate` are the two parts the weights add to a cold
  call's Retry-After: the ETA of a download under way, and a shorter first-start estimate when
  the weights are already in RAM.
- `cached` and `delete` serve the cache API; a repo a runtime uses cannot be deleted.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.downloads import (
    ACTIVE,
    QUEUED,
    DownloadConfig,
    DownloadError,
    DownloadRequest,
    DownloadTracker,
    download_snapshot,
    eta_seconds,
)
from runtimes.registry import LIVE_STATES, RuntimeRegistry
from runtimes.storage import (
    GB,
    RepoCache,
    Residency,
    StorageError,
    delete_repo,
    list_cached,
    prime,
    residency,
)

log = logging.getLogger(__name__)

# A download request not picked up by a worker within this long may be asked for again.
REQUEST_TTL_SECONDS = 600
PRIME_LOCK_SECONDS = 3600
# How often the workers measure the page-cache residency of the cached models (for the web).
RESIDENCY_REFRESH_SECONDS = 60
# Assumed disk read rate until a priming has measured one.
DEFAULT_READ_BYTES_PER_SECOND = 1 * GB
# Even with every weight in RAM an engine still allocates its KV cache, compiles and captures
# CUDA graphs: a first-start estimate never drops below this share of the catalog's figure.
MIN_ESTIMATE_SHARE = 0.25


class WeightsInUse(StorageError):
    """The weights are used by a runtime or a download and cannot be deleted now."""


class NotCached(StorageError):
    """The weights are not in the cache."""


@dataclass(frozen=True)
class WeightsConfig:
    download: DownloadConfig
    prime_budget_bytes: int  # 0: never prime


def cold_start_estimate(base_seconds: float, weight_bytes: int, resident_fraction: float,
                        read_bytes_per_second: float) -> float:
    """A first start's estimate given where the weights are.

    `base_seconds` (the catalog's figure) is taken to include reading every weight from disk;
    bytes already in the page cache skip that read.
    """
    saved = weight_bytes * max(0.0, min(1.0, resident_fraction)) / read_bytes_per_second
    return max(base_seconds * MIN_ESTIMATE_SHARE, base_seconds - saved)


class ModelWeights:
    def __init__(
        self,
        config: WeightsConfig,
        client: redis.Redis,
        catalog: ModelCatalog,
        registry: RuntimeRegistry,
        request_download: Callable[[str, bool], None] | None = None,
    ):
        self.config = config
        self.redis = client
        self.catalog = catalog
        self.registry = registry
        self.tracker = DownloadTracker(client, registry.prefix)
        # How a download is asked for without waiting for it (a Celery task in production);
        # by default it runs here and now (the command line).
        self.request_download = request_download or self._download_here
        self._prefix = f"{registry.prefix}:weights"

    @property
    def hf_home(self):
        return self.config.download.hf_home

    def spec(self, model: str) -> ModelSpec:
        spec = self.catalog.get(model)
        if spec is None:
            raise KeyError(model)
        return spec

    def cache(self, spec: ModelSpec) -> RepoCache:
        return RepoCache(self.hf_home, spec.repo_id)

    def is_local(self, spec: ModelSpec) -> bool:
        return self.cache(spec).is_complete(spec.revision)

    # -- before a start ------------------------------------------------------------------------

    def prepare_for_start(self, spec: ModelSpec) -> bool:
        """True when `spec` may start now; False when its weights are being fetched first."""
        if not spec.download_weights:
            return True
        if any(r.state in LIVE_STATES for r in self.registry.for_model(spec.id)):
            return True  # its weights are local already; a scale-out needs nothing more
        if self.tracker.active(spec.repo_id, spec.revision):
            return False
        if not self.is_local(spec):
            log.info("%s: weights of %s not in the cache; downloading before the start",
                     spec.id, spec.repo_id)
            self.ask_download(spec, for_start=True)
            return False
        self.note_used(spec)
        try:
            self.measure(spec)  # what is in RAM as the start begins: the estimate's input
        except (OSError, StorageError) as exc:
            log.warning("residency of %s unknown: %s", spec.id, exc)
        if self.config.prime_budget_bytes > 0:
            threading.Thread(target=self._prime_quietly, args=(spec.id,), daemon=True,
                             name=f"prime {spec.id}").start()
        return True

    def _prime_quietly(self, model: str) -> None:
        try:
            self.prime(model, record_residency=False)
        except (OSError, StorageError) as exc:
            log.warning("priming %s failed: %s", model, exc)

    # -- downloads -------------------------------------------------------------------------------

    def download_request(self, spec: ModelSpec) -> DownloadRequest:
        return DownloadRequest(spec.id, spec.repo_id, spec.revision, spec.hf_allow_patterns,
                               spec.hf_ignore_patterns)

    def download_state(self, spec: ModelSpec) -> dict | None:
        state = self.tracker.state(spec.repo_id, spec.revision)
        if state and state.get("status") in ACTIVE and not self.tracker.active(spec.repo_id,
                                                                               spec.revision):
            # Its worker died (the lock expired): asked for again, it resumes.
            state = {**state, "status": "interrupted", "eta_seconds": None}
        return state

    def ask_download(self, spec: ModelSpec, for_start: bool = False) -> tuple[dict, bool]:
        """Ask for a download of `spec` once; return its state and whether this call asked."""
        if not self.tracker.claim_request(spec.repo_id, spec.revision, REQUEST_TTL_SECONDS):
            return self.download_state(spec) or {"status": QUEUED}, False
        state = self.tracker.update(
            spec.repo_id, spec.revision, model=spec.id, repo_id=spec.repo_id,
            revision=spec.revision or "main", status=QUEUED, requested_at=time.time(),
            error=None, eta_seconds=None, rate_bytes_per_second=None, finished_at=None,
            bytes_done=None, bytes_total=None, files_total=None,
        )
        self.request_download(spec.id, for_start)
        return state, True

    def download(self, model: str, for_start: bool = False) -> dict:
        """Fetch `model`'s weights (the download task's body); raise `DownloadError` on failure.

        A failed download for a start counts as a failed start of the model, so the autoscaler
        backs off and, after three, the model answers `model_failed` with the reason.
        """
        spec = self.spec(model)
        try:
            state = download_snapshot(self.download_request(spec), self.config.download,
                                      self.tracker)
            self.note_residency(spec)
            return state
        except DownloadError as exc:
            if for_start:
                self.registry.note_failed_start(spec.id, {
                    "instance": None, "exit_code": None, "reason": f"download {exc.status}: {exc}",
                    "last_logs": "", "at": time.time(),
                })
                self.registry.record_decisions([{
                    "at": time.time(), "action": "mark_failed", "model": spec.id,
                    "instance": "", "reason": f"download {exc.status}: {exc}",
                }])
            raise

    def _download_here(self, model: str, for_start: bool) -> None:
        try:
            self.download(model, for_start)
        except DownloadError:
            pass  # recorded in its state

    def start_wanted(self, model: str) -> bool:
        """A realtime caller is waiting for `model` (its demand is recorded)."""
        return model in self.registry.demand()

    # -- the page cache --------------------------------------------------------------------------

    def _key(self, kind: str, spec: ModelSpec) -> str:
        return f"{self._prefix}:{kind}:{spec.repo_id}@{spec.revision or 'main'}"

    def measure(self, spec: ModelSpec) -> Residency | None:
        """How much of `spec`'s weights is in RAM now (and remember it for estimates)."""
        files = self.cache(spec).weight_files(spec.revision)
        if not files:
            return None
        found = residency(files)
        self.redis.set(self._key("residency", spec), json.dumps(
            {**found.describe(), "measured_at": time.time()}), ex=7 * 24 * 3600)
        return found

    # Page-cache statistics are measured by the workers (after a download or a priming, and by
    # the autoscaler's tick every RESIDENCY_REFRESH_SECONDS) and read back by the web app: a
    # `mincore` over gigabytes of weights has no place in a web worker's request.

    def note_residency(self, spec: ModelSpec) -> dict | None:
        """Measure how much of `spec`'s weights is in RAM and keep it for the web to show."""
        files = self.cache(spec).weight_files(spec.revision)
        found = _residency_or_none(files)
        if found is not None:
            self.redis.set(f"{self._prefix}:residency_seen:{spec.repo_id}",
                           json.dumps({**found, "measured_at": time.time()}),
                           ex=7 * 24 * 3600)
        return found

    def seen_residency(self, repo_id: str) -> dict | None:
        """The last measured residency of a repo's weights (None: not measured lately)."""
        raw = self.redis.get(f"{self._prefix}:residency_seen:{repo_id}")
        return json.loads(raw) if raw else None

    def refresh_residency(self) -> None:
        """Measure every cached model of the catalog (one per repo), at most every
        RESIDENCY_REFRESH_SECONDS whoever asks."""
        if not self.redis.set(f"{self._prefix}:residency_refresh", "1", nx=True,
                              ex=RESIDENCY_REFRESH_SECONDS):
            return
        seen: set[str] = set()
        for spec in self.catalog:
            if spec.repo_id not in seen and self.is_local(spec):
                seen.add(spec.repo_id)
                self.note_residency(spec)

    def remembered_residency(self, spec: ModelSpec) -> dict | None:
        raw = self.redis.get(self._key("residency", spec))
        return json.loads(raw) if raw else None

    def prime_state(self, spec: ModelSpec) -> dict | None:
        raw = self.redis.get(self._key("prime", spec))
        return json.loads(raw) if raw else None

    def _set_prime_state(self, spec: ModelSpec, **fields) -> dict:
        state = {**(self.prime_state(spec) or {}), **fields, "model": spec.id,
                 "repo_id": spec.repo_id, "updated_at": time.time()}
        self.redis.set(self._key("prime", spec), json.dumps(state), ex=7 * 24 * 3600)
        return state

    def ask_prime(self, spec: ModelSpec, enqueue: Callable[[str], None]) -> tuple[dict, bool]:
        if not self.is_local(spec):
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
        spec = self.spec(model)
        lock = self.redis.lock(self._key("prime_lock", spec), timeout=PRIME_LOCK_SECONDS)
        if not lock.acquire(blocking=False):
            # Another priming (a start's) is at it; its state is this one's answer.
            self.redis.delete(self._key("prime_requested", spec))
            return self.prime_state(spec) or {"status": "priming"}
        try:
            files = self.cache(spec).weight_files(spec.revision)
            if not files:
                raise NotCached(f"no weight files of {spec.id} in the cache")
            self._set_prime_state(spec, status="priming", started_at=time.time(), error=None)
            report = prime(files, self.config.prime_budget_bytes)
            if report.read_bytes >= 256 * 1024 * 1024 and report.seconds > 0:
                # Large reads measure the disk; small ones mostly measure the call overhead.
                rate = report.read_bytes / report.seconds
                self.redis.set(f"{self._prefix}:read_rate", f"{rate:.0f}")
            if record_residency:
                self.redis.set(self._key("residency", spec), json.dumps(
                    {**report.after.describe(), "measured_at": time.time()}), ex=7 * 24 * 3600)
            self.redis.set(f"{self._prefix}:residency_seen:{spec.repo_id}", json.dumps(
                {**report.after.describe(), "measured_at": time.time()}), ex=7 * 24 * 3600)
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

    # -- Retry-After ---------------------------------------------------------------------------

    def download_wait_seconds(self, spec: ModelSpec) -> float:
        """Seconds until a download of `spec`'s weights under way is done (0: none)."""
        if not spec.download_weights:
            return 0.0
        state = self.download_state(spec)
        if not state or state.get("status") not in ACTIVE:
            return 0.0
        fallback = int(spec.weights_gb * GB) if spec.weights_gb else None
        return eta_seconds(state, fallback, self.tracker.last_rate()) or 0.0

    def scale_cold_estimate(self, spec: ModelSpec, base_seconds: float) -> float:
        """The first-start estimate of `spec`, shorter when its weights are known to be in RAM."""
        if not spec.download_weights:
            return base_seconds
        known = self.remembered_residency(spec)
        if not known:
            return base_seconds
        raw = self.redis.get(f"{self._prefix}:read_rate")
        rate = float(raw) if raw else DEFAULT_READ_BYTES_PER_SECOND
        return cold_start_estimate(base_seconds, known["weight_bytes"],
                                   known["resident_fraction"], rate)

    # -- the cache API ---------------------------------------------------------------------------

    def note_used(self, spec: ModelSpec) -> None:
        self.redis.hset(f"{self._prefix}:last_used", spec.repo_id, f"{time.time():.3f}")

    def _users(self, repo_id: str) -> list[str]:
        """Runtimes (ids) whose model loads `repo_id`."""
        users = []
        for record in self.registry.all():
            spec = self.catalog.get(record.model)
            if record.state in LIVE_STATES and spec is not None and spec.repo_id == repo_id:
                users.append(record.id)
        return users

    def _specs_of(self, repo_id: str) -> list[ModelSpec]:
        return [s for s in self.catalog if s.repo_id == repo_id]

    def cached(self) -> list[dict]:
        last_used = {k.decode(): float(v)
                     for k, v in self.redis.hgetall(f"{self._prefix}:last_used").items()}
        instance_use = self.registry.last_used()
        records = self.registry.all()
        rows = []
        for repo in list_cached(self.hf_home):
            specs = self._specs_of(repo.repo_id)
            models = {s.id for s in specs}
            live = [r for r in records if r.model in models and r.state in LIVE_STATES]
            used = [last_used.get(repo.repo_id, 0.0), repo.last_access]
            used += [instance_use.get(r.id, r.ready_at or r.created_at) for r in live]
            weights = RepoCache(self.hf_home, repo.repo_id)
            revision = specs[0].revision if specs else None
            files = weights.weight_files(revision)
            if not files and repo.revisions:
                files = weights.weight_files(repo.revisions[-1].commit)
            rows.append({
                "repo_id": repo.repo_id,
                "models": sorted(models),
                "size_bytes": repo.size_bytes,
                "incomplete_bytes": repo.incomplete_bytes,
                "revisions": [{"commit": r.commit, "refs": list(r.refs), "files": r.files,
                               "complete": r.complete} for r in repo.revisions],
                "last_used_at": max(used) or None,
                "in_use_by": [r.id for r in live],
                "residency": self.seen_residency(repo.repo_id) if files else None,
            })
        return rows

    def delete(self, name: str) -> dict:
        """Remove a repo from the cache by catalog model id or repo id; refuse while it is used."""
        spec = self.catalog.get(name)
        repo_id = spec.repo_id if spec is not None else name
        if not RepoCache(self.hf_home, repo_id).path.is_dir():
            raise NotCached(f"{repo_id} is not in the cache")
        users = self._users(repo_id)
        if users:
            raise WeightsInUse(f"{repo_id} is used by runtime(s) {', '.join(users)}; stop them "
                               f"first")
        revisions = {s.revision for s in self._specs_of(repo_id)} | {None}
        locks = []
        try:
            # Holding the download locks keeps a download from starting while the files go.
            for revision in revisions:
                lock = self.tracker.lock(repo_id, revision)
                if not lock.acquire(blocking=False):
                    raise WeightsInUse(f"{repo_id} is being downloaded")
                locks.append(lock)
            freed = delete_repo(self.hf_home, repo_id)
            for revision in revisions:
                self.tracker.forget(repo_id, revision)
            self.redis.hdel(f"{self._prefix}:last_used", repo_id)
        finally:
            for lock in locks:
                lock.release()
        log.info("deleted %s from the cache: %.2f GB freed", repo_id, freed / GB)
        return {"repo_id": repo_id, "freed_bytes": freed}


def prime_command(weights: ModelWeights, model: str) -> int:
    """`python -m runtimes prime MODEL`: prime here and now, print the report; exit status."""
    try:
        report = weights.prime(model)
    except KeyError:
        print(f"error: {model} is not in the catalog", file=sys.stderr)
        return 2
    except (OSError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report.get("status") == "done" else 1


def _residency_or_none(files) -> dict | None:
    try:
        return residency(files).describe() if files else None
    except (OSError, StorageError):
        return None  # a file went meanwhile, or no mincore here
