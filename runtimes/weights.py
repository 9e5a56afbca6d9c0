"""A model's weights as the control plane sees them: on disk or not, downloading, in RAM or not.

`ModelWeights` is three parts, built together from the same settings, each with one concern:

- `disk` (`runtimes.weight_cache.WeightCache`): the shared cache on disk, whether a model is
  local, the cache API's listing and deletion (a repo a runtime uses cannot be deleted);
- `pages` (`runtimes.page_cache.PageCache`): how much of the weights is in RAM and priming them
  there; measured by the workers only, read back by the web, and the shorter first-start
  estimate (`scale_cold_estimate`) of a model whose weights are in RAM;
- `downloads` (`runtimes.weight_downloads.WeightDownloads`): asking for and running downloads,
  their state and the ETA a download under way adds to a cold call's Retry-After.

Callers use the part they need (`weights.downloads.download(...)`, `weights.pages.prime(...)`,
`weights.disk.cached(...)`). What needs all three is here: `prepare_for_start(spec)`, the
control plane's step before it claims GPUs for a start. A model whose engine loads weights
(`download_weights` in the catalog) and whose snapshot is not complete gets a download requested
instead of a start; the start comes on a later tick, once the download task has finished (it
asks for the start itself when a caller is waiting). A model that is local starts at once, and
its weights are read into the page cache while the engine starts (`prime`, bounded by
`PRIME_BUDGET_GB`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.downloads import DownloadConfig, DownloadTracker
from runtimes.page_cache import PageCache
from runtimes.registry import LIVE_STATES, RuntimeRegistry
from runtimes.storage import StorageError
from runtimes.weight_cache import WeightCache
from runtimes.weight_downloads import WeightDownloads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsConfig:
    download: DownloadConfig
    prime_budget_bytes: int  # 0: never prime


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
        self.registry = registry
        # The cache deletes under the downloads' locks: both parts share one tracker.
        tracker = DownloadTracker(client, registry.prefix)
        self.disk = WeightCache(config.download.hf_home, client, catalog, registry, tracker)
        self.pages = PageCache(client, self.disk, config.prime_budget_bytes, registry.prefix)
        self.downloads = WeightDownloads(config.download, self.disk, self.pages, registry,
                                         tracker, request_download)

    def prepare_for_start(self, spec: ModelSpec) -> bool:
        """True when `spec` may start now; False when its weights are being fetched first."""
        if not spec.download_weights:
            return True
        if any(r.state in LIVE_STATES for r in self.registry.for_model(spec.id)):
            return True  # its weights are local already; a scale-out needs nothing more
        # A base of LoRA adapters starts once their weights are here too: the engine loads
        # them from its HF cache on their first call.
        wanted = [spec] + [self.disk.spec(a.id) for a in self.disk.catalog.adapters(spec.id)
                           if a.hf_repo is not None]
        missing = False
        for weights in wanted:
            if self.downloads.tracker.active(weights.repo_id, weights.revision):
                missing = True
            elif not self.disk.is_local(weights):
                log.info("%s: weights of %s not in the cache; downloading before the start",
                         spec.id, weights.repo_id)
                self.downloads.ask_download(weights, for_start=weights is spec)
                missing = True
        if missing:
            return False
        self.disk.note_used(spec)
        try:
            self.pages.measure(spec)  # what is in RAM as the start begins: the estimate's input
        except (OSError, StorageError) as exc:
            log.warning("residency of %s unknown: %s", spec.id, exc)
        if self.config.prime_budget_bytes > 0:
            threading.Thread(target=self._prime_quietly, args=(spec.id,), daemon=True,
                             name=f"prime {spec.id}").start()
        return True

    def _prime_quietly(self, model: str) -> None:
        try:
            self.pages.prime(model, record_residency=False)
        except (OSError, StorageError) as exc:
            log.warning("priming %s failed: %s", model, exc)


def prime_command(weights: ModelWeights, model: str) -> int:
    """`python -m runtimes prime MODEL`: prime here and now, print the report; exit status."""
    try:
        report = weights.pages.prime(model)
    except KeyError:
        print(f"error: {model} is not in the catalog", file=sys.stderr)
        return 2
    except (OSError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report.get("status") == "done" else 1
