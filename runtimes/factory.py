"""Builds the control plane from settings: Redis, catalog, registry, backend.

Shared by the web app, the Celery workers and the `python -m runtimes` command line, so all of
them see the same runtimes the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from config.settings import Settings
from runtimes.backends.base import Backend
from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.downloads import DownloadConfig
from runtimes.inventory import gpu_memory, gpus_by_host, load_inventory
from runtimes.redis_client import make_redis
from runtimes.registry import RuntimeRegistry
from runtimes.storage import GB, default_prime_budget
from runtimes.weights import ModelWeights, WeightsConfig


def make_backend(settings: Settings) -> Backend:
    if settings.runtime_backend == "process":
        env = {"HF_HOME": str(settings.hf_home)}
        if settings.hf_token:
            env["HF_TOKEN"] = settings.hf_token
        return ProcessBackend(settings.runtime_state_dir, host=settings.runtime_host, base_env=env,
                              path_prepend=vllm_bin(settings))
    from runtimes.backends.docker import DockerBackend  # only where Docker is used

    return DockerBackend.from_settings(settings)


def vllm_bin(settings: Settings) -> tuple[str, ...]:
    """The vLLM venv's bin/ for the engines' PATH: `vllm serve` there runs the CPU build of
    `make vllm-venv` (or any venv VLLM_VENV names) without touching the orchestrator's PATH."""
    return (str(settings.vllm_venv / "bin"),) if settings.vllm_venv else ()


def gpu_inventory(settings: Settings) -> dict[str, tuple[int, ...]]:
    """GPU ids per host; empty when no host has any, so GPUs go unmanaged (a laptop, CI)."""
    inventory = gpus_by_host(load_inventory(settings))
    return inventory if any(inventory.values()) else {}


def build_control_plane(
    settings: Settings,
    client: redis.Redis | None = None,
    request_start: Callable[[str, int], None] | None = None,
    *,
    request_download: Callable[[str, bool], None] | None = None,
    batch_pending: Callable[[], dict[str, int]] | None = None,
    on_started: Callable[[str, str, float], None] | None = None,
    registry: RuntimeRegistry | None = None,
) -> ControlPlane:
    """The control plane with every hook given: without them, starts and downloads run in
    this process (the command line)."""
    client = client or make_redis(settings)
    catalog = ModelCatalog.from_file(settings.model_catalog_file, settings.runtime_type)
    registry = registry or RuntimeRegistry(client)
    return ControlPlane(
        catalog,
        registry,
        make_backend(settings),
        default_idle_timeout=settings.idle_timeout_seconds,
        start_timeout=settings.start_timeout_seconds,
        drain_timeout=settings.upstream_read_timeout,
        restart_backoff_base=settings.restart_backoff_seconds,
        request_start=request_start,
        # 0 turns sleep mode off.
        sleep_after_seconds=settings.sleep_after_seconds or None,
        scale_out_waiting=settings.scale_out_waiting,
        min_lifetime=settings.min_lifetime_seconds,
        batch_per_runtime=settings.batch_max_inflight_per_runtime,
        gpu_inventory=gpu_inventory(settings),
        gpu_memory=gpu_memory(settings, load_inventory(settings)),
        batch_pending=batch_pending,
        on_started=on_started,
        weights=build_model_weights(settings, client, catalog, registry, request_download),
    )


def build_model_weights(settings: Settings, client: redis.Redis, catalog: ModelCatalog,
                        registry: RuntimeRegistry,
                        request_download: Callable[[str, bool], None] | None = None,
                        ) -> ModelWeights:
    budget = settings.prime_budget_gb
    download = DownloadConfig(settings.hf_home, settings.hf_endpoint, settings.hf_token,
                              int(settings.download_disk_margin_gb * GB))
    prime_budget = default_prime_budget() if budget is None else int(budget * GB)
    return ModelWeights(WeightsConfig(download, prime_budget), client, catalog, registry,
                        request_download)
