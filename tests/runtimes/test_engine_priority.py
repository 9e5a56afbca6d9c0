"""engine_priority: what each engine is sent, by its flags, the kind of work and the job
priority; the order it yields is the order the gateway promises (realtime, then batch by job
priority, larger sooner), in each engine's own polarity."""

from __future__ import annotations

import pytest

from runtimes.catalog import ModelSpec
from runtimes.engine_priority import BATCH, REALTIME, engine_priority, lower_runs_first

VLLM_PRIORITY = ModelSpec("m", "vllm", args=("--max-num-seqs", "8", "--scheduling-policy",
                                             "priority"))
VLLM_EQUALS = ModelSpec("m", "vllm", args=("--scheduling-policy=priority",))
VLLM_FCFS = ModelSpec("m", "vllm", args=("--scheduling-policy", "fcfs"))
VLLM_PLAIN = ModelSpec("m", "vllm")
VLLM_LAST_WINS = ModelSpec("m", "vllm", args=("--scheduling-policy", "priority",
                                              "--scheduling-policy", "fcfs"))
SIM_PRIORITY = ModelSpec("m", "sim", args=("--scheduling-policy", "priority"))
SIM_PLAIN = ModelSpec("m", "sim")
SGLANG_PRIORITY = ModelSpec("m", "sglang", args=("--enable-priority-scheduling",))
SGLANG_LOW_FIRST = ModelSpec("m", "sglang", args=("--enable-priority-scheduling",
                                                  "--schedule-low-priority-values-first"))
SGLANG_PLAIN = ModelSpec("m", "sglang", args=("--schedule-low-priority-values-first",))


@pytest.mark.parametrize(("spec", "kind", "job", "expected"), [
    (VLLM_PRIORITY, REALTIME, 0, 0),
    (VLLM_PRIORITY, BATCH, 9, 1),
    (VLLM_PRIORITY, BATCH, 5, 5),
    (VLLM_PRIORITY, BATCH, 0, 10),
    (VLLM_EQUALS, REALTIME, 0, 0),
    (VLLM_EQUALS, BATCH, 0, 10),
    (SIM_PRIORITY, REALTIME, 0, 0),
    (SIM_PRIORITY, BATCH, 3, 7),
    (SGLANG_PRIORITY, REALTIME, 0, 10),
    (SGLANG_PRIORITY, BATCH, 9, 9),
    (SGLANG_PRIORITY, BATCH, 0, 0),
    (SGLANG_LOW_FIRST, REALTIME, 0, 0),
    (SGLANG_LOW_FIRST, BATCH, 9, 1),
    (SGLANG_LOW_FIRST, BATCH, 0, 10),
    # Not in priority mode: send nothing (vLLM documents a non-zero priority there as an error).
    (VLLM_FCFS, REALTIME, 0, None),
    (VLLM_FCFS, BATCH, 5, None),
    (VLLM_PLAIN, BATCH, 5, None),
    (VLLM_LAST_WINS, BATCH, 5, None),
    (SIM_PLAIN, REALTIME, 0, None),
    (SGLANG_PLAIN, BATCH, 5, None),
])
def test_engine_priority_table(spec, kind, job, expected):
    assert engine_priority(spec, kind, job) == expected


@pytest.mark.parametrize("spec", [VLLM_PRIORITY, SIM_PRIORITY, SGLANG_PRIORITY,
                                  SGLANG_LOW_FIRST])
def test_order_is_realtime_then_batch_by_job_priority(spec):
    """Sorted by what the engine runs first, the values give realtime, then batch 9 down to 0."""
    work = [(REALTIME, 0)] + [(BATCH, p) for p in range(10)]
    low_first = lower_runs_first(spec)
    ranked = sorted(work, key=lambda w: engine_priority(spec, *w) * (1 if low_first else -1))
    assert ranked == [(REALTIME, 0)] + [(BATCH, p) for p in range(9, -1, -1)]
    values = [engine_priority(spec, *w) for w in work]
    assert len(set(values)) == len(values)  # no batch priority ties with realtime or another


def test_vllm_realtime_is_the_engine_default():
    """A call with no priority field (0 on vLLM) ranks with realtime, never behind batch."""
    assert engine_priority(VLLM_PRIORITY, REALTIME) == 0
    assert min(engine_priority(VLLM_PRIORITY, BATCH, p) for p in range(10)) > 0


@pytest.mark.parametrize(("kind", "job"), [("eval", 0), (BATCH, 10), (BATCH, -1)])
def test_bad_arguments_are_refused(kind, job):
    with pytest.raises(ValueError):
        engine_priority(VLLM_PRIORITY, kind, job)
