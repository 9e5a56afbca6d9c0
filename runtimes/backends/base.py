"""The one interface every backend offers: start, stop, list and read logs of engine instances.

Instances carry their identity with them (Docker labels, or a state file beside a process), so
`list()` after an orchestrator restart finds every instance the orchestrator started, and the
autoscaler adopts them instead of starting duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtimes.catalog import ModelSpec
from runtimes.engines import Engine


class BackendError(RuntimeError):
    """A backend could not do what was asked (the message says what and why)."""


@dataclass(frozen=True)
class Started:
    handle: str
    host: str
    port: int


@dataclass(frozen=True)
class Observed:
    """An instance as the backend sees it, whatever the registry says."""

    instance_id: str
    model: str
    engine: str
    handle: str
    host: str
    port: int
    running: bool
    exit_code: int | None = None
    fingerprint: str = ""
    gpus: tuple[int, ...] = ()
    gpu_host: str = "local"
    started_at: float = 0.0
    extra: dict = field(default_factory=dict)


class Backend:
    name = ""

    def start(
        self, instance_id: str, spec: ModelSpec, engine: Engine, gpus: tuple[int, ...],
        gpu_host: str = "local", memory_fraction: float | None = None,
    ) -> Started:
        """Run one engine on `gpus` of `gpu_host`; `memory_fraction`: its share of each GPU's
        memory when it shares them (runtimes.placement), passed as the engine's memory flag."""
        raise NotImplementedError

    def stop(self, handle: str, grace: float = 10.0) -> None:
        """Stop gracefully, kill after `grace` seconds, and forget the instance."""
        raise NotImplementedError

    def list(self) -> list[Observed]:
        raise NotImplementedError

    def logs(self, handle: str, tail: int = 50) -> str:
        raise NotImplementedError
