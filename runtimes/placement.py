"""GPU placement by memory: which host and GPUs an engine instance gets. Pure functions, no I/O.

A GPU has memory, not one slot. An engine whose catalog entry states its `weights_gb` (and
optionally `kv_cache_gb`) needs, on each of its GPUs, its share of weights and KV cache plus a
fixed overhead (activations, CUDA graphs, the CUDA context); it is told that share of the GPU's
memory (vLLM `--gpu-memory-utilization`, SGLang `--mem-fraction-static`), so engines placed side
by side stay within the GPU. An asleep engine (vLLM sleep level 1: weights in CPU memory, KV
cache dropped) keeps only its CUDA context on the GPU, so a sleeping model and a loaded one share
a GPU. An engine whose size is not known, or any engine on a host whose GPU memory is not known
(no `nvidia-smi`, no `GPU_MEMORY_GB`), takes its GPUs whole, as before memory was modelled.

A model needing N GPUs (tensor parallel) gets N GPUs of one host, each with room for it. Among
the fits, the one leaving the least memory free wins (best fit), then the host with the fewest
GPUs that fit: small engines pack onto GPUs already in use, and whole GPUs stay free for large
models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runtimes.catalog import ModelSpec
from runtimes.engines import engine_for
from runtimes.registry import LIVE_STATES, SLEEPING, RuntimeRecord

LOCAL_HOST = "local"

Inventory = dict[str, tuple[int, ...]]
Placement = tuple[str, tuple[int, ...]]
# GB of memory of each GPU of a host (one figure per host); a host missing: not known.
GpuMemory = dict[str, float]
# GB held on each GPU: host -> GPU id -> GB (WHOLE_GPU when an engine has it to itself).
Held = dict[str, dict[int, float]]

WHOLE_GPU = math.inf
# Of a GPU's memory, the share engines may be given: the rest is for the driver, other
# processes and fragmentation (vLLM's own default is 0.9 for an engine alone).
USABLE_SHARE = 0.95
# Per GPU, beyond weights and KV cache: activations, CUDA graphs, the CUDA context.
OVERHEAD_GB = 2.0
# Per GPU, what an asleep engine keeps: its CUDA context and the allocator's pools.
ASLEEP_GB = 1.0
# KV cache when the catalog gives weights_gb but no kv_cache_gb: a share of the weights, enough
# for a few dozen sequences of a few thousand tokens on the 7B-70B models of a team's box.
DEFAULT_KV_SHARE = 0.4
MIN_KV_GB = 2.0


@dataclass(frozen=True)
class Footprint:
    """GB one instance holds on each of its GPUs, awake and asleep, and the share of each GPU's
    memory it is told to stay within (None: the engine's own default, or its engine_args)."""

    awake: float
    asleep: float
    fraction: float | None = None

    @property
    def whole(self) -> bool:
        return self.awake == WHOLE_GPU


def footprint(spec: ModelSpec | None, gpu_memory_gb: float | None) -> Footprint:
    """What an instance of `spec` holds per GPU on a GPU of `gpu_memory_gb` GB."""
    whole = Footprint(WHOLE_GPU, WHOLE_GPU)
    if spec is None or not gpu_memory_gb or gpu_memory_gb <= 0:
        return whole
    given = engine_for(spec).memory_fraction(spec)
    if given is not None:
        # The operator sized it in engine_args: that share is what it takes.
        awake = given * gpu_memory_gb
        return Footprint(awake, min(awake, ASLEEP_GB))
    if spec.weights_gb is None:
        return whole
    gpus = max(1, spec.gpus)
    kv = spec.kv_cache_gb
    if kv is None:
        kv = max(MIN_KV_GB, DEFAULT_KV_SHARE * spec.weights_gb)
    awake = (spec.weights_gb + kv) / gpus + OVERHEAD_GB
    # Rounded up to the hundredth (after float noise: 44/80 is 0.55, not 0.56).
    fraction = math.ceil(round(awake / gpu_memory_gb * 100, 6)) / 100
    if fraction > USABLE_SHARE:
        # It does not fit beside anything: it gets the GPU whole and the engine sizes itself.
        return whole
    return Footprint(fraction * gpu_memory_gb, min(awake, ASLEEP_GB), fraction)


def capacity(gpu_memory_gb: float | None) -> float | None:
    return gpu_memory_gb * USABLE_SHARE if gpu_memory_gb else None


def holds(record: RuntimeRecord, print_: Footprint) -> float:
    """GB per GPU `record` holds in its state: asleep, only its context, unless a wake-up has
    claimed its memory back (`ControlPlane` marks it waking under the placement lock)."""
    if record.state == SLEEPING and not record.meta.get("waking"):
        return print_.asleep
    return print_.awake


def held_memory(records: Iterable[RuntimeRecord], catalog: Mapping[str, ModelSpec],
                gpu_memory: GpuMemory) -> Held:
    """GB held on each GPU by the instances that are alive (starting, serving, asleep, draining
    or stopping). An instance whose model left the catalog holds its GPUs whole until it is
    gone: its size is no longer known."""
    held: Held = {}
    for record in records:
        if record.state not in LIVE_STATES or not record.gpus:
            continue
        amount = holds(record, footprint(catalog.get(record.model),
                                         gpu_memory.get(record.gpu_host)))
        on_host = held.setdefault(record.gpu_host, {})
        for gpu in record.gpus:
            on_host[gpu] = on_host.get(gpu, 0.0) + amount
    return held


def release(held: Held, record: RuntimeRecord, amount: float) -> Held:
    """`held` less `amount` GB on each GPU of `record` (a copy)."""
    out = {host: dict(gpus) for host, gpus in held.items()}
    on_host = out.setdefault(record.gpu_host, {})
    for gpu in record.gpus:
        left = on_host.get(gpu, 0.0) - amount
        on_host[gpu] = 0.0 if left < 1e-9 or math.isnan(left) else left
    return out


def with_reservations(held: Held, reservations: Mapping[str, Placement], model: str,
                      catalog: Mapping[str, ModelSpec], gpu_memory: GpuMemory) -> Held:
    """`held`, plus what the models that GPUs are set aside for (freed by evictions made for
    them) will take there; `model`'s own reservation is its to use."""
    out = {host: dict(gpus) for host, gpus in held.items()}
    for owner, (host, gpus) in reservations.items():
        if owner == model:
            continue
        need = footprint(catalog.get(owner), gpu_memory.get(host)).awake
        on_host = out.setdefault(host, {})
        for gpu in gpus:
            on_host[gpu] = on_host.get(gpu, 0.0) + need
    return out


def fits(held_gb: float, need_gb: float, gpu_memory_gb: float | None) -> bool:
    """Whether `need_gb` more fits on a GPU of `gpu_memory_gb` holding `held_gb` already. A GPU
    taken whole, or wanted whole, or of unknown memory, fits only when nothing holds it."""
    if need_gb == WHOLE_GPU or held_gb == WHOLE_GPU or not gpu_memory_gb:
        return held_gb == 0.0
    return held_gb + need_gb <= capacity(gpu_memory_gb) + 1e-9


def place(gpus_needed: int, needs: Mapping[str, float], inventory: Inventory,
          gpu_memory: GpuMemory, held: Held) -> Placement | None:
    """A host and GPU ids for an instance needing `needs[host]` GB on each of `gpus_needed`
    GPUs of one host, or None if none fits."""
    if gpus_needed <= 0:
        # CPU-only engines (the sim) run on the first host, or locally when there is none.
        return (next(iter(inventory), LOCAL_HOST), ())
    best: tuple | None = None
    for host, ids in inventory.items():
        memory = gpu_memory.get(host)
        need = needs.get(host, WHOLE_GPU) if memory else WHOLE_GPU
        on_host = held.get(host, {})
        fitting = []
        for gpu in ids:
            taken = on_host.get(gpu, 0.0)
            if fits(taken, need, memory):
                left = 0.0 if need == WHOLE_GPU else capacity(memory) - taken - need
                fitting.append((left, gpu))
        if len(fitting) < gpus_needed:
            continue
        chosen = sorted(fitting)[:gpus_needed]
        score = (sum(left for left, _ in chosen), len(fitting), host)
        if best is None or score < best[0]:
            best = (score, host, tuple(sorted(gpu for _, gpu in chosen)))
    return None if best is None else (best[1], best[2])


def needs_of(spec: ModelSpec | None, inventory: Inventory, gpu_memory: GpuMemory) -> dict:
    """GB per GPU an instance of `spec` needs awake, on each host (hosts may differ in memory)."""
    return {host: footprint(spec, gpu_memory.get(host)).awake for host in inventory}


def place_spec(spec: ModelSpec, inventory: Inventory, gpu_memory: GpuMemory,
               held: Held) -> Placement | None:
    """`place` for a new instance of `spec`."""
    return place(spec.gpus, needs_of(spec, inventory, gpu_memory), inventory, gpu_memory, held)
