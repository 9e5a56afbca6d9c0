"""The sim engine's settings: what the command line can set, shared by every other module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtimes.sim.lora import LoraOptions


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything the command line can set; the timings mirror what a real engine spends."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    load_seconds: float = 0.0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    max_concurrency: int = 256
    max_model_len: int = 4096
    crash_after: int = 0
    fail_start: bool = False
    sleep_seconds: float = 0.2
    wake_seconds: float = 0.5
    snapshot_dir: str | None = None
    scheduling_policy: str = "fcfs"  # vLLM's --scheduling-policy: fcfs | priority
    root: str | None = None  # what /v1/models reports as `root`: the repo loaded, as vLLM does
    lora: LoraOptions | None = None  # --enable-lora and its flags (runtimes.sim.lora); None: off
    runner: str = "generate"  # vLLM's --runner: generate | pooling (embeddings, score, rerank)
    hidden_size: int = 64  # the length of a pooling runner's embeddings
    api_key: str | None = None  # vLLM's --api-key: /v1 routes then need it as a bearer token
