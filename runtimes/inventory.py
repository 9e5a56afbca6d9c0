"""The GPU hosts engines may run on: their Docker endpoints, addresses and GPU ids.

One `GpuHost` per machine. The docker backend holds one Docker client per host, and the placer
picks a host and GPUs from the same list, so both agree on what exists. The process backend has
one host, "local", with the GPUs of `GPUS`.

The settings that describe the hosts (`DOCKER_HOSTS`, `GPUS`) are parsed by `config.hosts`.

GPU memory, by which several engines share a GPU when they fit (`runtimes.placement`), is
`GPU_MEMORY_GB` for every host, else on the local host what nvidia-smi reports (the smallest
GPU's, so that a placement fits every one of them); a container has no nvidia-smi, so set it
there. Where it is not known, each engine takes its GPUs whole.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from typing import TYPE_CHECKING

from config.hosts import DEFAULT_DOCKER_URL, LOCAL_HOST, GpuHost, TlsFiles

__all__ = ["DEFAULT_DOCKER_URL", "LOCAL_HOST", "GpuHost", "TlsFiles", "detect_gpu_memory",
           "detect_gpus", "gpu_memory", "gpus_by_host", "load_inventory", "parse_gpu_memory"]

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

@functools.cache
def detect_gpus() -> tuple[int, ...]:
    """The local GPU ids as nvidia-smi reports them; none when there is no nvidia-smi."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return ()
    try:
        result = subprocess.run(
            [binary, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return tuple(int(line) for line in result.stdout.split())
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        # A broken driver must not stop the orchestrator; engines needing GPUs will not place.
        log.warning("nvidia-smi did not list the GPUs (%s); assuming none; set GPUS", exc)
        return ()


def parse_gpu_memory(text: str) -> dict[int, float]:
    """GB per GPU id from `nvidia-smi --query-gpu=index,memory.total --format=csv,noheader,
    nounits` (which reports MiB)."""
    memory = {}
    for line in text.splitlines():
        if line.strip():
            index, mib = (part.strip() for part in line.split(","))
            memory[int(index)] = float(mib) / 1024
    return memory


@functools.cache
def detect_gpu_memory() -> dict[int, float]:
    """GB of each local GPU as nvidia-smi reports it; none when there is no nvidia-smi."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return {}
    try:
        result = subprocess.run(
            [binary, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return parse_gpu_memory(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("nvidia-smi did not give the GPUs' memory (%s); each engine takes its GPUs "
                    "whole; set GPU_MEMORY_GB", exc)
        return {}


def gpu_memory(settings: Settings, hosts: list[GpuHost]) -> dict[str, float]:
    """GB of each GPU per host, where it is known (the shape the placer takes)."""
    if settings.gpu_memory_gb is not None:
        return {host.name: settings.gpu_memory_gb for host in hosts if host.gpus}
    local = [host for host in hosts if host.name == LOCAL_HOST and host.gpus]
    if not local:
        return {}
    detected = detect_gpu_memory()
    sizes = [detected[g] for g in local[0].gpus if g in detected]
    return {LOCAL_HOST: min(sizes)} if sizes and len(sizes) == len(local[0].gpus) else {}


def load_inventory(settings: Settings) -> list[GpuHost]:
    """The hosts engines may run on, for the backend in use."""
    if settings.runtime_backend == "docker" and settings.docker_hosts:
        return list(settings.docker_hosts)
    gpus = settings.gpus if settings.gpus is not None else detect_gpus()
    return [GpuHost(name=LOCAL_HOST, url=settings.docker_host, address=settings.runtime_host,
                    gpus=gpus)]


def gpus_by_host(hosts: list[GpuHost]) -> dict[str, tuple[int, ...]]:
    """The inventory in the shape the placer takes: host name -> GPU ids."""
    return {host.name: host.gpus for host in hosts}
