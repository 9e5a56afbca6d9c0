"""Priority inside the engine: the `priority` a request carries to vLLM, SGLang or the sim.

The gateway already orders work before it reaches an engine (realtime first; batch lines by job
priority, under the admission cap). But a busy engine has its own queue, and there a realtime call
that arrives behind a few batch lines waits for them unless the engine schedules by priority too.
vLLM and SGLang both can, with opposite polarities:

- vLLM: `--scheduling-policy priority`; a request's `priority` is an integer, lower runs first
  (ties by arrival), default 0. The request field's own documentation says a non-zero priority
  is an error when the engine is not in priority mode (vLLM 0.32.0 in fact accepts and ignores
  it; we do not rely on that).
- SGLang: `--enable-priority-scheduling`; higher runs first, unless
  `--schedule-low-priority-values-first` turns it round.
- The sim engine has vLLM's flag and polarity.

`engine_priority(spec, kind, job_priority)` says what to send: realtime calls the most urgent
value, batch lines (and eval samples, which are batch work) less urgent ones that keep the job
priority's order (0 to 9, larger sooner), or None when the engine is not in priority mode, so
that nothing is sent that the engine might refuse.
"""

from __future__ import annotations

from runtimes.catalog import ModelSpec

REALTIME = "realtime"
BATCH = "batch"
KINDS = (REALTIME, BATCH)
JOB_PRIORITIES = range(10)  # the API's batch priority: 0 to 9, larger runs sooner

# The flags that put each engine in priority mode, and the one that turns SGLang's polarity.
VLLM_POLICY_FLAG = "--scheduling-policy"
SGLANG_PRIORITY_FLAG = "--enable-priority-scheduling"
SGLANG_LOW_FIRST_FLAG = "--schedule-low-priority-values-first"


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    """The value of `flag` in an argv (`--flag value` or `--flag=value`; the last one wins)."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _has_switch(args: tuple[str, ...], flag: str) -> bool:
    return any(arg == flag or (arg.startswith(flag + "=") and arg.split("=", 1)[1].lower()
               in ("1", "true", "yes")) for arg in args)


def lower_runs_first(spec: ModelSpec) -> bool | None:
    """The engine's polarity in priority mode: True if lower values run first, False if
    higher do; None when the engine (as the catalog starts it) does not schedule by priority."""
    if spec.engine in ("vllm", "sim"):
        return True if _flag_value(spec.args, VLLM_POLICY_FLAG) == "priority" else None
    if spec.engine == "sglang":
        if not _has_switch(spec.args, SGLANG_PRIORITY_FLAG):
            return None
        return _has_switch(spec.args, SGLANG_LOW_FIRST_FLAG)
    return None


def engine_priority(spec: ModelSpec, kind: str, job_priority: int = 0) -> int | None:
    """The `priority` to put in a request body for this engine, or None to send none.

    Realtime calls get the most urgent value; a batch line gets one less urgent than any
    realtime call, one step less urgent per step of job priority below 9:

    | engine polarity      | realtime | batch, job priority p (0-9) |
    |----------------------|----------|-----------------------------|
    | lower first (vLLM)   | 0        | 10 - p  (1..10)             |
    | higher first (SGLang)| 10       | p       (0..9)              |

    Realtime is 0 on vLLM, its default, so a call that carries no priority at all (a client
    talking to the engine directly) ranks with realtime, never behind batch.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == BATCH and job_priority not in JOB_PRIORITIES:
        raise ValueError(f"job priority must be 0 to 9, got {job_priority!r}")
    polarity = lower_runs_first(spec)
    if polarity is None:
        return None
    top = len(JOB_PRIORITIES)  # 10
    if polarity:
        return 0 if kind == REALTIME else top - job_priority
    return top if kind == REALTIME else job_priority


def set_engine_priority(spec: ModelSpec, body: dict, kind: str, job_priority: int = 0) -> bool:
    """Put the gateway's `priority` for this work into `body` (in place); True if it changed.

    A caller's own `priority` never reaches the engine: the gateway ranks realtime against batch
    and batch jobs against each other, so a client cannot jump its own queue by asking. When the
    engine is not in priority mode the field is removed, because vLLM documents a non-zero
    priority there as an error.
    """
    value = engine_priority(spec, kind, job_priority)
    if value is None:
        return body.pop("priority", None) is not None
    if body.get("priority") == value and type(body.get("priority")) is int:
        return False
    body["priority"] = value
    return True
