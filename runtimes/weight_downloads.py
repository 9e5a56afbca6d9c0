"""Downloads of catalog models' weights: asked for once, run by a worker, their ETA for Retry-After.

`WeightDownloads` turns a catalog model into a download of its snapshot
(`runtimes.downloads.download_snapshot`, one per repo and revision under a Redis lock):

- `ask_download` asks for it once (a `SET NX` per repo and revision) through `request_download`,
  a Celery task in production; `download` is that task's body;
- `download_state` is its progress, with a download whose worker died shown as `interrupted`;
- `download_wait_seconds` is what a download under way adds to a cold call's Retry-After.

Its Redis keys are the `DownloadTracker`'s (`{prefix}:downloads:...`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from runtimes.catalog import ModelSpec
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
from runtimes.page_cache import PageCache
from runtimes.registry import RuntimeRegistry
from runtimes.storage import GB
from runtimes.weight_cache import WeightCache

# A download request not picked up by a worker within this long may be asked for again.
REQUEST_TTL_SECONDS = 600


class WeightDownloads:
    def __init__(
        self,
        config: DownloadConfig,
        disk: WeightCache,
        pages: PageCache,
        registry: RuntimeRegistry,
        tracker: DownloadTracker,
        request_download: Callable[[str, bool], None] | None = None,
    ):
        self.config = config
        self.disk = disk
        self.pages = pages
        self.registry = registry
        self.tracker = tracker
        # How a download is asked for without waiting for it (a Celery task in production);
        # by default it runs here and now (the command line).
        self.request_download = request_download or self._download_here

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
        spec = self.disk.spec(model)
        try:
            state = download_snapshot(self.download_request(spec), self.config, self.tracker)
            self.pages.note_residency(spec)
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

    def download_wait_seconds(self, spec: ModelSpec) -> float:
        """Seconds until a download of `spec`'s weights under way is done (0: none)."""
        if not spec.download_weights:
            return 0.0
        state = self.download_state(spec)
        if not state or state.get("status") not in ACTIVE:
            return 0.0
        fallback = int(spec.weights_gb * GB) if spec.weights_gb else None
        return eta_seconds(state, fallback, self.tracker.last_rate()) or 0.0
