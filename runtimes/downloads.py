"""Downloads of model snapshots into the shared Hugging Face cache, one per repo and revision.

`download_snapshot` fetches what an engine needs of a repository (see `storage.select_files`)
with huggingface_hub's `snapshot_download`, after checking that the disk has room for it. It runs
under a Redis lock per repo and revision (`SET NX`, renewed while the download lives), so however
often a download is asked for, and by however many workers, one runs; the others see its state.

Its state lives in Redis (`DownloadTracker`): status, bytes done and total (measured on disk every
half second: finished blobs plus the partial files being written), rate over the last seconds and
the ETA. The API shows it, and cold calls add the ETA to their Retry-After.

Resuming: huggingface_hub retries a transfer that breaks off mid-file with a `Range` request from
the last whole 10 MB chunk; files already complete stay in the cache, so a download that failed
(or whose worker died: the lock then expires) and is asked for again fetches only what is
missing. The partial file of an interrupted process is discarded by huggingface_hub (2.x keeps
partial files private to one process), so at worst one file is fetched again.
"""

from __future__ import annotations

import glob
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from runtimes.storage import (
    COMMIT_RE,
    GB,
    InsufficientDiskSpace,
    RepoCache,
    check_free_space,
    hub_dir,
    select_files,
)

log = logging.getLogger(__name__)

QUEUED, RESOLVING, DOWNLOADING, DONE, FAILED, REFUSED = (
    "queued", "resolving", "downloading", "done", "failed", "refused",
)
ACTIVE = (QUEUED, RESOLVING, DOWNLOADING)
LOCK_SECONDS = 60  # renewed every few seconds while the download lives
PROGRESS_INTERVAL_SECONDS = 0.5
RATE_WINDOW_SECONDS = 10.0
# Assumed when nothing has been measured yet: a modest link to the Hub.
DEFAULT_BYTES_PER_SECOND = 100 * 1024 * 1024


@dataclass(frozen=True)
class DownloadConfig:
    hf_home: Path
    endpoint: str | None = None  # None: huggingface_hub's default (HF_ENDPOINT or the Hub)
    token: str | None = field(default=None, repr=False)  # never in a log line
    disk_margin_bytes: int = 10 * GB
    max_workers: int = 8


@dataclass(frozen=True)
class DownloadRequest:
    """What to fetch: a repo at a revision, with the catalog entry's file patterns."""

    model: str
    repo_id: str
    revision: str | None = None
    allow: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None

    @property
    def revision_name(self) -> str:
        return self.revision or "main"


class DownloadError(RuntimeError):
    """A download failed; `transient` when trying again later may succeed."""

    def __init__(self, message: str, *, status: str = FAILED, transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient


class DownloadTracker:
    """The state of downloads in Redis, their request deduplication and their locks."""

    def __init__(self, client: redis.Redis, prefix: str = "gw"):
        self.redis = client
        self.prefix = prefix

    def _key(self, kind: str, repo_id: str, revision: str | None) -> str:
        return f"{self.prefix}:downloads:{kind}:{repo_id}@{revision or 'main'}"

    def state(self, repo_id: str, revision: str | None) -> dict | None:
        raw = self.redis.get(self._key("state", repo_id, revision))
        return json.loads(raw) if raw else None

    def update(self, repo_id: str, revision: str | None, /, **fields) -> dict:
        key = self._key("state", repo_id, revision)
        # One writer at a time holds the lock, so read-modify-write needs no transaction.
        state = {**(self.state(repo_id, revision) or {}), **fields, "updated_at": time.time()}
        self.redis.set(key, json.dumps(state), ex=30 * 24 * 3600)
        return state

    def forget(self, repo_id: str, revision: str | None) -> None:
        self.redis.delete(self._key("state", repo_id, revision))

    def claim_request(self, repo_id: str, revision: str | None, ttl: float) -> bool:
        """True for the first to ask for this download until it ends (or `ttl` passes)."""
        return bool(self.redis.set(self._key("requested", repo_id, revision), "1", nx=True,
                                   ex=max(1, int(ttl))))

    def release_request(self, repo_id: str, revision: str | None) -> None:
        self.redis.delete(self._key("requested", repo_id, revision))

    def keep_request(self, repo_id: str, revision: str | None, ttl: float) -> None:
        self.redis.set(self._key("requested", repo_id, revision), "1", ex=max(1, int(ttl)))

    def lock(self, repo_id: str, revision: str | None) -> redis.lock.Lock:
        return self.redis.lock(self._key("lock", repo_id, revision), timeout=LOCK_SECONDS)

    def running(self, repo_id: str, revision: str | None) -> bool:
        return bool(self.redis.exists(self._key("lock", repo_id, revision)))

    def active(self, repo_id: str, revision: str | None) -> bool:
        """A download of this repo and revision is asked for or under way."""
        return bool(self.redis.exists(self._key("lock", repo_id, revision),
                                      self._key("requested", repo_id, revision)))

    def note_rate(self, bytes_per_second: float) -> None:
        self.redis.set(f"{self.prefix}:downloads:last_rate", f"{bytes_per_second:.0f}")

    def last_rate(self) -> float | None:
        raw = self.redis.get(f"{self.prefix}:downloads:last_rate")
        return float(raw) if raw else None


def eta_seconds(state: dict, fallback_total: int | None, rate_guess: float | None) -> float | None:
    """Seconds until a download in `state` is done: measured, else guessed from a past rate."""
    if state.get("status") not in ACTIVE:
        return None
    if state.get("eta_seconds") is not None:
        return float(state["eta_seconds"])
    total = state.get("bytes_total") or fallback_total
    if not total:
        return None
    remaining = max(0, total - (state.get("bytes_done") or 0))
    return remaining / (rate_guess or DEFAULT_BYTES_PER_SECOND)


class _ProgressMonitor(threading.Thread):
    """Measures a running download on disk and publishes it; keeps the lock alive meanwhile."""

    def __init__(self, cache: RepoCache, files: dict[str, tuple[int, str]], present: set[str],
                 publish: Callable[[dict], None], keep_alive: Callable[[], None]):
        super().__init__(name=f"download-progress {cache.repo_id}", daemon=True)
        self.cache = cache
        self.files = files
        self.present = present
        self.publish = publish
        self.keep_alive = keep_alive
        self.total = sum(size for size, _ in files.values())
        self.samples: deque[tuple[float, int]] = deque()
        self.best = 0
        self.stopped = threading.Event()

    def measure(self) -> int:
        sizes: dict[str, int] = {}
        try:
            for entry in self.cache.blobs.iterdir():
                try:
                    sizes[entry.name] = entry.stat().st_size
                except OSError:
                    continue  # renamed into place meanwhile
        except OSError:
            return 0
        done = 0
        for path, (size, etag) in self.files.items():
            if path in self.present or etag in sizes:
                done += size
                continue
            # huggingface_hub writes to `<etag>.<random>.incomplete` and renames when done.
            done += sum(n for name, n in sizes.items()
                        if name.startswith(etag + ".") and name.endswith(".incomplete"))
        # A file between its rename and our listing can vanish for one sample: never go back.
        self.best = min(self.total, max(self.best, done))
        return self.best

    def sample(self) -> dict:
        now = time.monotonic()
        done = self.measure()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()
        first_at, first_done = self.samples[0]
        rate = (done - first_done) / (now - first_at) if now - first_at >= 0.2 else None
        remaining = self.total - done
        eta = remaining / rate if rate else None
        return {"bytes_done": done, "rate_bytes_per_second": round(rate, 1) if rate else None,
                "eta_seconds": round(eta, 1) if eta is not None else None}

    def run(self) -> None:
        last_renewal = time.monotonic()
        while not self.stopped.wait(PROGRESS_INTERVAL_SECONDS):
            self.publish(self.sample())
            if time.monotonic() - last_renewal > LOCK_SECONDS / 4:
                self.keep_alive()
                last_renewal = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def _quiet_tqdm():
    # snapshot_download draws progress bars on stderr; a worker's log is no place for them.
    from huggingface_hub.utils import tqdm as hf_tqdm

    class QuietTqdm(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


def _etag(entry) -> str:
    # The blob's name in the cache is the ETag the Hub answers: the sha256 for LFS files, the
    # git blob id otherwise.
    return entry.lfs.sha256 if entry.lfs is not None else entry.blob_id


def _describe_hub_error(request: DownloadRequest, exc: Exception) -> DownloadError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{request.repo_id}@{request.revision_name}"
    if isinstance(exc, GatedRepoError):
        return DownloadError(f"the Hub refused {what}: the repo is gated; set HF_TOKEN to a token "
                             f"that has been granted access")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(f"the Hub has no repo {request.repo_id} (or it is private and "
                             f"HF_TOKEN has no access to it)")
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"the Hub has no revision {request.revision_name} of "
                             f"{request.repo_id}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status is not None and status < 500 and status != 429:
        return DownloadError(f"the Hub answered {status} for {what}: {exc}")
    return DownloadError(f"downloading {what} failed: {exc.__class__.__name__}: {exc}",
                         transient=True)


def plan_files(request: DownloadRequest, config: DownloadConfig) -> tuple[str, dict]:
    """Ask the Hub for the commit of the revision and the files to fetch: (commit, files) with
    files as {path: (size, etag)}."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=config.endpoint, token=config.token)
    revision = request.revision_name
    commit = revision if COMMIT_RE.match(revision) else api.model_info(
        request.repo_id, revision=revision).sha
    tree = {f.path: f for f in api.list_repo_tree(request.repo_id, recursive=True,
                                                  revision=commit) if isinstance(f, RepoFile)}
    weight_map = None
    indexes = sorted(p for p in tree if p.endswith("model.safetensors.index.json"))
    if indexes and request.allow is None and request.ignore is None:
        # The index names the shards; a safetensors file it does not name is a second copy.
        index_path = hf_hub_download(request.repo_id, indexes[0], revision=commit,
                                     cache_dir=hub_dir(config.hf_home), endpoint=config.endpoint,
                                     token=config.token, tqdm_class=_quiet_tqdm())
        weight_map = json.loads(Path(index_path).read_text()).get("weight_map") or None
    chosen = select_files(list(tree), request.allow, request.ignore, weight_map)
    return commit, {p: (tree[p].size, _etag(tree[p])) for p in chosen}


def download_snapshot(
    request: DownloadRequest,
    config: DownloadConfig,
    tracker: DownloadTracker,
) -> dict:
    """Fetch `request` into the cache unless another worker is at it; return its latest state.

    Raises `DownloadError` (with status `refused` when the disk is too small, `failed`
    otherwise) after recording it in the state.
    """
    repo, revision = request.repo_id, request.revision
    lock = tracker.lock(repo, revision)
    if not lock.acquire(blocking=False):
        return tracker.state(repo, revision) or {"status": QUEUED}
    monitor: _ProgressMonitor | None = None
    started = time.time()

    def publish(fields: dict) -> None:
        tracker.update(repo, revision, **fields)

    def keep_alive() -> None:
        lock.reacquire()
        tracker.keep_request(repo, revision, LOCK_SECONDS)

    try:
        publish({"model": request.model, "repo_id": repo, "revision": request.revision_name,
                 "status": RESOLVING, "started_at": started, "finished_at": None,
                 "error": None, "eta_seconds": None, "rate_bytes_per_second": None})
        from huggingface_hub import snapshot_download

        try:
            commit, files = plan_files(request, config)
            if not files:
                raise DownloadError(f"{repo}@{request.revision_name} has no file an engine "
                                    f"loads (check hf_allow_patterns / hf_ignore_patterns)")
            cache = RepoCache(config.hf_home, repo)
            present = {p for p, (_, etag) in files.items() if (cache.blobs / etag).is_file()}
            total = sum(size for size, _ in files.values())
            already = sum(files[p][0] for p in present)
            free = None
            if total > already:  # nothing to fetch needs no room
                free = check_free_space(hub_dir(config.hf_home), total - already,
                                        config.disk_margin_bytes,
                                        f"{repo}@{request.revision_name}")
            publish({"status": DOWNLOADING, "commit": commit, "bytes_total": total,
                     "bytes_done": already, "files_total": len(files),
                     "files": sorted(files), "free_bytes_before": free})
            log.info("downloading %s@%s (%s): %d files, %.2f GB of %.2f GB to fetch",
                     repo, request.revision_name, commit[:12], len(files),
                     (total - already) / GB, total / GB)
            monitor = _ProgressMonitor(cache, files, present, publish, keep_alive)
            monitor.start()
            snapshot_download(
                repo, revision=commit, cache_dir=str(hub_dir(config.hf_home)),
                allow_patterns=[glob.escape(p) for p in files],
                endpoint=config.endpoint, token=config.token, max_workers=config.max_workers,
                tqdm_class=_quiet_tqdm(),
            )
        except InsufficientDiskSpace as exc:
            raise DownloadError(str(exc), status=REFUSED) from None
        except DownloadError:
            raise
        except Exception as exc:  # huggingface_hub and httpx raise many kinds: name them all
            raise _describe_hub_error(request, exc) from exc
        if monitor is not None:
            monitor.stop()
        cache.write_ref(revision, commit)
        cache.write_manifest(commit, revision, {p: size for p, (size, _) in files.items()})
        seconds = time.time() - started
        fetched = total - already
        rate = fetched / seconds if seconds > 0 else None
        if rate and fetched > 1024 * 1024:
            tracker.note_rate(rate)
        log.info("downloaded %s@%s: %.2f GB in %.1f s (%.1f MB/s)", repo, request.revision_name,
                 fetched / GB, seconds, (rate or 0) / 1024**2)
        publish({"status": DONE, "bytes_done": total, "eta_seconds": 0, "finished_at": time.time(),
                 "rate_bytes_per_second": round(rate, 1) if rate else None,
                 "snapshot": str(cache.snapshot_dir(commit))})
        return tracker.state(repo, revision)
    except DownloadError as exc:
        if monitor is not None:
            monitor.stop()  # its last sample must not land after the failure
        log.error("download of %s@%s %s: %s", repo, request.revision_name, exc.status, exc)
        publish({"status": exc.status, "error": str(exc), "finished_at": time.time(),
                 "eta_seconds": None, "transient": exc.transient})
        raise
    finally:
        if monitor is not None:
            monitor.stop()
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("the download lock of %s expired before the download ended", repo)
        # After the lock: a request that arrives in between finds the download still "active"
        # and waits for the next tick instead of queueing a task that would find the lock held.
        tracker.release_request(repo, revision)
