"""How big batch work may be and how it is cut and run (from the settings, given once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLimits:
    max_lines: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    chunk_lines: int = 100
    chunk_parallel: int = 32
    line_attempts: int = 5
    per_runtime_cap: int = 64
    cancel_grace_seconds: float = 60.0
    # A running job with no line done for this long has lost chunk messages (a Redis restart,
    # a worker gone while its broker connection was down): its open chunks are sent again.
    stall_seconds: float = 600.0
