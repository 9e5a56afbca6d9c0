"""The synthetic day that `bench.simulate` replays: models, realtime calls and batch jobs.

Everything here is plain data, generated deterministically from a seed with `random.Random`, so
every policy replays exactly the same calls and jobs. Times are seconds from the start of the
trace; the trace starts at `start_hour` o'clock, which is what the daily shapes look at.

Realtime arrivals per model are a Markov-modulated Poisson process: a daily base rate, plus burst
episodes (a calm/burst chain whose switch-on rate also follows the day), evaluated on 10-second
segments. Batch jobs arrive mostly in office hours, with log-uniform sizes, a Celery-style
priority (0 most urgent) and a completion window.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

# GPUs of the simulated box: one host with two GPUs.
GPU_INVENTORY: dict[str, tuple[int, ...]] = {"local": (0, 1)}

SEGMENT_SECONDS = 10.0
SERVICE_SECONDS = (1.0, 6.0)
BATCH_LINES = (100, 5000)
SHORT_WINDOW, LONG_WINDOW = 4 * 3600.0, 24 * 3600.0


@dataclass(frozen=True)
class SimModel:
    id: str
    load_seconds: float  # cold load: weights from the page cache / disk into the GPU
    wake_seconds: float = 2.0  # vLLM sleep level 1: weights back from CPU memory
    gpus: int = 1
    # Sizes as the catalog states them (runtimes.placement); None: the model takes its GPUs whole.
    weights_gb: float | None = None
    kv_cache_gb: float | None = None


@dataclass(frozen=True)
class Call:
    """One realtime call: when it arrives and how long the engine takes to answer it."""

    id: int
    model: str
    arrival: float
    service: float


@dataclass(frozen=True)
class BatchJob:
    id: int
    model: str
    submitted: float
    lines: int
    priority: int  # 0 is the most urgent, as in Celery's Redis transport
    window: float  # seconds after submission by which every line should be done
    # Engine slot-seconds one line takes: at 32 slots, 4 s a line is the synthetic day's 8 lines/s.
    line_seconds: float = 4.0

    @property
    def deadline(self) -> float:
        return self.submitted + self.window


@dataclass(frozen=True)
class Trace:
    models: tuple[SimModel, ...]
    calls: tuple[Call, ...]  # by arrival
    jobs: tuple[BatchJob, ...]  # by submission
    duration: float  # seconds during which calls and jobs arrive
    start_hour: float = 0.0
    seed: int | None = None
    gpu_inventory: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(GPU_INVENTORY))
    # GB of each GPU per host; empty: not known, every engine takes its GPUs whole.
    gpu_memory: dict[str, float] = field(default_factory=dict)
    # Sequences an engine runs at once; calls beyond wait in its FIFO queue.
    concurrency: int = 32
    name: str = "synthetic day"

    def model(self, model_id: str) -> SimModel:
        return next(m for m in self.models if m.id == model_id)


# The three models of the day: a big one everybody uses in office hours, a small one called in
# short bursts (a script, a demo), and one called rarely; the small two also get batch work.
MODELS = (
    SimModel("gemma-3-27b", load_seconds=180.0),
    SimModel("qwen2.5-7b", load_seconds=60.0),
    SimModel("llama-3.1-8b", load_seconds=75.0),
)


@dataclass(frozen=True)
class ArrivalShape:
    """Calls per second at a given hour of the day, calm and in a burst."""

    base: Callable[[float], float]
    burst_rate: Callable[[float], float]  # extra calls per second during a burst
    bursts_per_hour: Callable[[float], float]
    burst_seconds: float = 120.0


def _office(hour: float) -> float:
    """0 at night, ramping up 8-9:30, 1 until 17, down by 19; a lunch dip."""
    if hour < 8 or hour >= 19:
        return 0.0
    if hour < 9.5:
        level = (hour - 8) / 1.5
    elif hour < 17:
        level = 1.0
    else:
        level = (19 - hour) / 2
    return level * (0.6 if 12 <= hour < 13 else 1.0)


def _daytime(hour: float) -> bool:
    return 7 <= hour < 23


SHAPES: dict[str, ArrivalShape] = {
    "gemma-3-27b": ArrivalShape(
        base=lambda h: 0.5 * _office(h) + (0.004 if _daytime(h) else 0.0015),
        burst_rate=lambda h: 1.0 * _office(h),
        bursts_per_hour=lambda h: 2.0 if _office(h) > 0 else 0.0,
        burst_seconds=120.0,
    ),
    "qwen2.5-7b": ArrivalShape(
        base=lambda h: 0.0003,
        burst_rate=lambda h: 0.5,
        bursts_per_hour=lambda h: 1.2 if 8 <= h < 20 else 0.25,
        burst_seconds=90.0,
    ),
    "llama-3.1-8b": ArrivalShape(
        base=lambda h: 1 / 1200 if 8 <= h < 20 else 1 / 3600,
        burst_rate=lambda h: 0.0,
        bursts_per_hour=lambda h: 0.0,
    ),
}

# Batch submissions per hour (office hours, other times) and how they spread over the models.
BATCH_PER_HOUR = (1.6, 0.4)
BATCH_MODELS = (("qwen2.5-7b", 0.45), ("llama-3.1-8b", 0.4), ("gemma-3-27b", 0.15))
SHORT_WINDOW_SHARE = 0.3


def _hour(start_hour: float, t: float) -> float:
    return (start_hour + t / 3600.0) % 24.0


def _calls(rng: random.Random, model: str, shape: ArrivalShape, duration: float,
           start_hour: float) -> list[tuple[float, str, float]]:
    out: list[tuple[float, str, float]] = []
    in_burst = False
    t = 0.0
    while t < duration:
        hour = _hour(start_hour, t)
        # Two-state chain, switched once per segment (segments are short next to episodes).
        if in_burst:
            in_burst = rng.random() >= 1 - math.exp(-SEGMENT_SECONDS / shape.burst_seconds)
        else:
            on_rate = shape.bursts_per_hour(hour) / 3600.0
            in_burst = rng.random() < 1 - math.exp(-on_rate * SEGMENT_SECONDS)
        rate = shape.base(hour) + (shape.burst_rate(hour) if in_burst else 0.0)
        end = min(t + SEGMENT_SECONDS, duration)
        if rate > 0:
            at = t + rng.expovariate(rate)
            while at < end:
                out.append((at, model, rng.uniform(*SERVICE_SECONDS)))
                at += rng.expovariate(rate)
        t = end
    return out


def _jobs(rng: random.Random, duration: float, start_hour: float) -> list[BatchJob]:
    out: list[BatchJob] = []
    names = [m for m, _ in BATCH_MODELS]
    weights = [w for _, w in BATCH_MODELS]
    t = 0.0
    while t < duration:
        hour = _hour(start_hour, t)
        rate = BATCH_PER_HOUR[0] if 8 <= hour < 18 else BATCH_PER_HOUR[1]
        end = min(t + 3600.0, duration)
        at = t + rng.expovariate(rate / 3600.0)
        while at < end:
            lo, hi = BATCH_LINES
            lines = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            window = SHORT_WINDOW if rng.random() < SHORT_WINDOW_SHARE else LONG_WINDOW
            out.append(BatchJob(id=len(out), model=rng.choices(names, weights)[0],
                                submitted=at, lines=lines, priority=rng.randint(0, 9),
                                window=window))
            at += rng.expovariate(rate / 3600.0)
        t = end
    return out


def generate_trace(seed: int, hours: float = 24.0, start_hour: float = 0.0) -> Trace:
    """The synthetic day (or `hours` of it from `start_hour`), the same for the same seed."""
    duration = hours * 3600.0
    raw: list[tuple[float, str, float]] = []
    for index, model in enumerate(MODELS):
        # One stream per model, so adding a model does not reshuffle the others' calls.
        rng = random.Random(f"{seed}:calls:{index}")
        raw += _calls(rng, model.id, SHAPES[model.id], duration, start_hour)
    raw.sort()
    calls = tuple(Call(id=i, model=m, arrival=a, service=s) for i, (a, m, s) in enumerate(raw))
    jobs = tuple(_jobs(random.Random(f"{seed}:batch"), duration, start_hour))
    return Trace(models=MODELS, calls=calls, jobs=jobs, duration=duration,
                 start_hour=start_hour, seed=seed)
