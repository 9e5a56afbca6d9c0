"""The shared weight cache on disk as the control plane and the cache API see it.

`WeightCache` finds a catalog model's repo in the Hugging Face cache (`runtimes.storage`):

- `is_local(spec)`: whether the model's snapshot is complete, so its engine may start;
- `note_used(spec)`: when a start last used a repo (the cache listing's last use);
- `cached()` and `delete()` serve the cache API; a repo a runtime uses, or a download is
  writing, cannot be deleted.

Its one Redis key is `{prefix}:weights:last_used` (a hash, repo id → time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import redis

from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.downloads import DownloadTracker
from runtimes.registry import LIVE_STATES, RuntimeRegistry
from runtimes.storage import GB, RepoCache, StorageError, delete_repo, list_cached

log = logging.getLogger(__name__)


class WeightsInUse(StorageError):
    """The weights are used by a runtime or a download and cannot be deleted now."""


class NotCached(StorageError):
    """The weights are not in the cache."""


class WeightCache:
    def __init__(self, hf_home: Path, client: redis.Redis, catalog: ModelCatalog,
                 registry: RuntimeRegistry, tracker: DownloadTracker):
        self.hf_home = hf_home
        self.redis = client
        self.catalog = catalog
        self.registry = registry
        # The downloads' locks: a deletion holds them so no download writes while files go.
        self.tracker = tracker
        self._last_used = f"{registry.prefix}:weights:last_used"

    def spec(self, model: str) -> ModelSpec:
        """The weights of a catalog model, or of a LoRA adapter from the Hub."""
        spec = self.catalog.weights_spec(model)
        if spec is None:
            raise KeyError(model)
        return spec

    def cache(self, spec: ModelSpec) -> RepoCache:
        return RepoCache(self.hf_home, spec.repo_id)

    def is_local(self, spec: ModelSpec) -> bool:
        return self.cache(spec).is_complete(spec.revision)

    def note_used(self, spec: ModelSpec) -> None:
        self.redis.hset(self._last_used, spec.repo_id, f"{time.time():.3f}")

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

    def cached(self, residency: Callable[[str], dict | None] = lambda repo_id: None
               ) -> list[dict]:
        """The cached repos, with the catalog models that use each, sizes, revisions, last use
        and the runtimes using them.

        `residency(repo_id)` gives the `residency` of a repo that has weight files: what the
        workers last measured (`runtimes.page_cache.PageCache.seen_residency`), never measured
        here, since the listing is served by a web worker.
        """
        last_used = {k.decode(): float(v) for k, v in self.redis.hgetall(self._last_used).items()}
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
                "residency": residency(repo.repo_id) if files else None,
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
            self.redis.hdel(self._last_used, repo_id)
        finally:
            for lock in locks:
                lock.release()
        log.info("deleted %s from the cache: %.2f GB freed", repo_id, freed / GB)
        return {"repo_id": repo_id, "freed_bytes": freed}
