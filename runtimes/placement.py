"""GPU placement: which host and which GPUs an engine instance gets. Pure functions, no I/O.

The inventory maps each GPU host to its GPU ids. A model needing N GPUs (tensor parallel) gets N
free GPUs of one host; no GPU is ever given twice. Among the hosts that fit, the one with the
fewest free GPUs wins (best fit), so large models still find a whole host free later.
"""

from __future__ import annotations

from collections.abc import Iterable

from runtimes.registry import LIVE_STATES, RuntimeRecord

LOCAL_HOST = "local"

Inventory = dict[str, tuple[int, ...]]
Placement = tuple[str, tuple[int, ...]]


def used_gpus(records: Iterable[RuntimeRecord]) -> dict[str, set[int]]:
    """GPUs held per host by instances that are alive (starting, serving, asleep or stopping)."""
    used: dict[str, set[int]] = {}
    for record in records:
        if record.state in LIVE_STATES and record.gpus:
            used.setdefault(record.gpu_host, set()).update(record.gpus)
    return used


def with_reservations(used: dict[str, set[int]], reservations: dict[str, Placement],
                      model: str) -> dict[str, set[int]]:
    """`used`, plus the GPUs set aside for other models (freed by evictions made for them)."""
    taken = {host: set(gpus) for host, gpus in used.items()}
    for owner, (host, gpus) in reservations.items():
        if owner != model:
            taken.setdefault(host, set()).update(gpus)
    return taken


def free_gpus(inventory: Inventory, used: dict[str, set[int]]) -> dict[str, tuple[int, ...]]:
    return {
        host: tuple(g for g in gpus if g not in used.get(host, set()))
        for host, gpus in inventory.items()
    }


def place(gpus_needed: int, inventory: Inventory, used: dict[str, set[int]]) -> Placement | None:
    """A host and GPU ids for an instance needing `gpus_needed` GPUs, or None if none fits."""
    if gpus_needed <= 0:
        # CPU-only engines (the sim) run on the first host, or locally when there is none.
        return (next(iter(inventory), LOCAL_HOST), ())
    fitting = [
        (len(free), host, free)
        for host, free in free_gpus(inventory, used).items()
        if len(free) >= gpus_needed
    ]
    if not fitting:
        return None
    _, host, free = min(fitting)
    return host, tuple(sorted(free)[:gpus_needed])
