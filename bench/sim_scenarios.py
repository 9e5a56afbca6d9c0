"""The trace scenarios of `bench/SIMULATE.md`, built from the public Azure LLM inference traces.

The Azure LLM inference traces 2023 (one hour each of a conversation and a code service,
November 2023; github.com/Azure/AzurePublicDataset, CC-BY; Patel et al., "Splitwise: Efficient
generative LLM inference using phase splitting", ISCA 2024) give real arrival times and token
counts, but no model names. Each scenario assigns them to the models of `MODELS` (three sizes of
a team's box: a 27B FP8 chat model, a 14B code model, an 8B model), thins or cuts them, and adds
batch jobs, deterministically (seeded). The files are read from `../shared/traces` beside the
checkout (or `--azure DIR`); nothing of them is copied into the repository.

- `hot-and-rare`: the whole conversation trace (~5 calls/s) on the chat model, the whole code
  trace (~2.5 calls/s, bursty) on the 8B model, and the code model called about once a minute
  (every 150th code call): a hot model beside a rare one that does not fit beside it on one GPU.
- `taking-turns`: ten-minute turns, chat, code, 8B, chat, code, 8B, each turn the calls of its
  window (the conversation trace for chat, a quarter of it for the 8B, the code trace for code).
- `idle-gaps`: thinned traces with idle gaps: a twentieth of the conversation calls on the chat
  model and a fifth of the code calls on the code model, each only in its own on-periods (3-6
  minutes on, 4-12 minutes off), the 8B called about 20 times an hour; and two batch jobs.

Each runs on one GPU and on two (80 GB each): on one, chat and code never fit together; on two
all three fit, and what remains is keeping idle engines loaded, asleep or stopped.
"""

from __future__ import annotations

import csv
import datetime
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURE_DIR = REPO_ROOT.parent / "shared" / "traces"
AZURE_FILES = {"conv": "azure-llm-2023-conv.csv", "code": "azure-llm-2023-code.csv"}
GPU_MEMORY_GB = 80.0
GPU_COUNTS = (1, 2)

# The models of every scenario, as the catalog would size them (runtimes.placement): awake,
# chat takes 44 GB of an 80 GB GPU, code 42 GB, the 8B 24 GB; chat and code never fit together.
MODELS = (
    {"id": "chat-27b-fp8", "load_seconds": 150, "wake_seconds": 4, "gpus": 1,
     "weights_gb": 28.0, "kv_cache_gb": 14.0},
    {"id": "code-14b", "load_seconds": 100, "wake_seconds": 4, "gpus": 1,
     "weights_gb": 29.5, "kv_cache_gb": 10.0},
    {"id": "small-8b", "load_seconds": 60, "wake_seconds": 2, "gpus": 1,
     "weights_gb": 16.0, "kv_cache_gb": 6.0},
)
CHAT, CODE, SMALL = (m["id"] for m in MODELS)

Request = tuple[float, int, int]  # seconds from the trace's start, prompt tokens, output tokens
Row = dict[str, object]


class AzureTraces:
    """The two Azure traces, as (seconds from each file's first row, prompt, output) lists."""

    def __init__(self, directory: Path = AZURE_DIR):
        self.directory = Path(directory)
        self._cache: dict[str, list[Request]] = {}

    def __getitem__(self, name: str) -> list[Request]:
        if name not in self._cache:
            path = self.directory / AZURE_FILES[name]
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            times = [datetime.datetime.fromisoformat(r["TIMESTAMP"]).timestamp() for r in rows]
            start = min(times)
            self._cache[name] = sorted(
                (t - start, int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                for t, r in zip(times, rows, strict=True))
        return self._cache[name]


def _rows(requests: list[Request], model: str) -> list[Row]:
    return [{"timestamp": f"{t:.3f}", "model": model, "prompt_tokens": p, "output_tokens": o}
            for t, p, o in requests]


def _every(requests: list[Request], k: int, offset: int = 0) -> list[Request]:
    return requests[offset::k]


def _within(requests: list[Request], windows: list[tuple[float, float]]) -> list[Request]:
    return [r for r in requests if any(a <= r[0] < b for a, b in windows)]


def _on_periods(rng: random.Random, duration: float, on: tuple[float, float],
                off: tuple[float, float]) -> list[tuple[float, float]]:
    """Alternating on and off periods of random lengths (seconds), starting off."""
    periods, t = [], rng.uniform(*off) / 2
    while t < duration:
        length = rng.uniform(*on)
        periods.append((t, min(duration, t + length)))
        t += length + rng.uniform(*off)
    return periods


def _batch(requests: list[Request], model: str, job: str, at: float, priority: int,
           window: float) -> list[Row]:
    """A batch job whose lines have the token counts of `requests`, all sent at `at`."""
    return [{"timestamp": f"{at:.3f}", "model": model, "prompt_tokens": p, "output_tokens": o,
             "kind": "batch", "job": job, "priority": priority, "window_s": window}
            for _, p, o in requests]


def hot_and_rare(azure: AzureTraces) -> list[Row]:
    return (_rows(azure["conv"], CHAT) + _rows(azure["code"], SMALL)
            + _rows(_every(azure["code"], 150, 75), CODE)
            + _batch(_every(azure["conv"], 13)[:1500], SMALL, "small-nightly", 600.0, 3, 3600.0))


def taking_turns(azure: AzureTraces) -> list[Row]:
    turn, rows = 600.0, []
    for index, model in enumerate((CHAT, CODE, SMALL, CHAT, CODE, SMALL)):
        window = [(index * turn, (index + 1) * turn)]
        if model == CHAT:
            rows += _rows(_within(azure["conv"], window), CHAT)
        elif model == CODE:
            rows += _rows(_within(azure["code"], window), CODE)
        else:
            rows += _rows(_every(_within(azure["conv"], window), 4), SMALL)
    return rows


def idle_gaps(azure: AzureTraces) -> list[Row]:
    rng = random.Random("idle-gaps")
    hour = 3600.0
    chat_on = _on_periods(rng, hour, (180.0, 360.0), (240.0, 720.0))
    code_on = _on_periods(rng, hour, (180.0, 360.0), (240.0, 720.0))
    return (_rows(_within(_every(azure["conv"], 20), chat_on), CHAT)
            + _rows(_within(_every(azure["code"], 5), code_on), CODE)
            + _rows(_every(azure["conv"], 1000, 500), SMALL)
            + _batch(_every(azure["code"], 3)[:2000], CODE, "code-review", 300.0, 5, 7200.0)
            + _batch(_every(azure["conv"], 17)[:800], SMALL, "summaries", 1200.0, 9, 3600.0))


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[AzureTraces], list[Row]]
    about: str


SCENARIOS = (
    Scenario("hot-and-rare", hot_and_rare,
             "chat: all conversation calls (~5/s); 8B: all code calls (~2.5/s, bursty); code: "
             "every 150th code call (~1/min); a 1,500-line batch job for the 8B"),
    Scenario("taking-turns", taking_turns,
             "10-minute turns: chat, code, 8B, chat, code, 8B (each its window's calls)"),
    Scenario("idle-gaps", idle_gaps,
             "chat: 1/20 of the conversation calls and code: 1/5 of the code calls, each only "
             "in its own 3-6 min on-periods (4-12 min off); 8B: ~20 calls/h; two batch jobs"),
)

FIELDS = ("timestamp", "model", "prompt_tokens", "output_tokens", "kind", "job", "priority",
          "window_s")


def write(scenario: Scenario, azure: AzureTraces, directory: Path) -> tuple[Path, Path]:
    """The scenario's trace CSV and models JSON, written into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    trace, models = directory / f"{scenario.name}.csv", directory / "models.json"
    rows = sorted(scenario.build(azure), key=lambda r: float(r["timestamp"]))
    with open(trace, "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    models.write_text(json.dumps(list(MODELS), indent=1) + "\n")
    return trace, models
