"""Token usage per key, project, model and kind, in per-minute and per-day buckets in Redis.

No row per call: each bucket is one Redis hash whose fields are counters, one per (key,
project, model, kind) and figure (requests, prompt tokens, completion tokens), added to with
HINCRBY. Web workers add their calls' usage in memory and write it with the usage report they
make about once a second anyway (`webapp.usage.UsageTracker`), in the same pipelined round
trip; batch workers write a line's usage once, when its result is stored for the first time
(a line run twice is counted once).

Minute buckets are kept `MINUTE_KEEP_SECONDS` (8 days: enough for a week by the minute or the
hour), day buckets `DAY_KEEP_SECONDS` (400 days). `query` reads the buckets of a range and sums
them by time bucket and by key, model or project.

The usage itself comes from the engine's answer (`usage_in`): `prompt_tokens` and
`completion_tokens` (completions, chat, embeddings), or `input_tokens` and `output_tokens`
(Responses, Anthropic Messages). A call that failed counts what the engine reported (usually
nothing but the request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

MINUTE, HOUR, DAY = 60, 3600, 86400
BUCKETS = {"minute": MINUTE, "hour": HOUR, "day": DAY}
GROUPS = ("key", "model", "project", "kind")
MINUTE_KEEP_SECONDS = 8 * DAY
DAY_KEEP_SECONDS = 400 * DAY
_SEP = "\x1f"  # between the parts of a field: no key name or model id holds it
_FIGURES = ("requests", "prompt_tokens", "completion_tokens")
_USAGE = b'"usage"'
_decoder = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class UsageKey:
    key: str
    project: str
    model: str
    kind: str  # realtime | batch | eval


def usage_in(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last `usage` object in an engine's answer (a whole
    body, or a stream's event), or None when there is none. Read from the last `"usage"`
    on, not by parsing the whole answer: that is where vLLM writes it."""
    at = data.rfind(_USAGE)
    if at < 0:
        return None
    colon = data.find(b":", at + len(_USAGE))
    if colon < 0:
        return None
    try:
        usage, _ = _decoder.raw_decode(data[colon + 1:].decode(errors="replace").lstrip())
    except ValueError:
        return None
    return tokens_of(usage)


def tokens_of(usage) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return max(0, prompt), max(0, completion)


class UsageLedger:
    def __init__(self, client: redis.Redis, prefix: str = "gw"):
        self.redis = client
        self.prefix = prefix

    def _bucket_key(self, size: str, start: int) -> str:
        return f"{self.prefix}:usage:{size}:{start}"

    def write(self, pipe, counts: dict[UsageKey, list[int]], at: float) -> None:
        """Add `counts` ([requests, prompt, completion] per key) to the buckets of time `at`,
        on `pipe` (the caller executes it)."""
        if not counts:
            return
        minute = self._bucket_key("minute", int(at // MINUTE) * MINUTE)
        day = self._bucket_key("day", int(at // DAY) * DAY)
        for usage_key, figures in counts.items():
            field = _SEP.join((usage_key.key, usage_key.project, usage_key.model, usage_key.kind))
            for name, value in zip(_FIGURES, figures, strict=True):
                if value:
                    pipe.hincrby(minute, f"{field}{_SEP}{name}", value)
                    pipe.hincrby(day, f"{field}{_SEP}{name}", value)
        pipe.expire(minute, MINUTE_KEEP_SECONDS)
        pipe.expire(day, DAY_KEEP_SECONDS)

    def add(self, counts: dict[UsageKey, list[int]], at: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self.write(pipe, counts, at)
        pipe.execute()

    def query(self, start: float, end: float, bucket: str = "hour", group_by: str = "model",
              project: str | None = None, key: str | None = None) -> list[dict]:
        """The usage of [start, end) summed by `bucket` and `group_by`, of one project or one
        key when given; rows in time order, then by group."""
        size = BUCKETS[bucket]
        source = "day" if bucket == "day" else "minute"
        step = BUCKETS[source]
        first = int(start // step) * step
        starts = list(range(first, int(end), step))
        pipe = self.redis.pipeline(transaction=False)
        for bucket_start in starts:
            pipe.hgetall(self._bucket_key(source, bucket_start))
        rows: dict[tuple[int, str], dict] = {}
        for bucket_start, fields in zip(starts, pipe.execute(), strict=True):
            for raw, value in fields.items():
                key_name, key_project, model, kind, figure = raw.decode().split(_SEP)
                if (project is not None and key_project != project) or (
                        key is not None and key_name != key):
                    continue
                group = {"key": key_name, "model": model, "project": key_project,
                         "kind": kind}[group_by]
                at = bucket_start // size * size
                row = rows.setdefault((at, group), {
                    "start": at, group_by: group, "requests": 0, "prompt_tokens": 0,
                    "completion_tokens": 0})
                row[figure] += int(value)
        for row in rows.values():
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        return [rows[k] for k in sorted(rows)]


def line_counts(owner: dict, results) -> dict[UsageKey, list[int]]:
    """The usage of batch lines and eval samples stored for the first time: a line's engine
    answer (`response.body.usage`), or an eval sample's tally (its sample and judge calls, by
    model: `usage:<model>:<figure>`)."""
    kind = "eval" if owner.get("kind") == "eval_run" else "batch"
    counts: dict[UsageKey, list[int]] = {}

    def add(model: str, requests: int, prompt: int, completion: int) -> None:
        usage_key = UsageKey(owner.get("owner") or "", owner.get("project") or "", model, kind)
        figures = counts.setdefault(usage_key, [0, 0, 0])
        figures[0] += requests
        figures[1] += prompt
        figures[2] += completion

    for result in results:
        tally = result.tally or {}
        by_model: dict[str, dict[str, int]] = {}
        for name, value in tally.items():
            if name.startswith("usage:"):
                model, _, figure = name[len("usage:"):].rpartition(":")
                by_model.setdefault(model, {})[figure] = value
        if by_model:
            for model, figures in by_model.items():
                add(model, figures.get("invocation_count", 0), figures.get("prompt_tokens", 0),
                    figures.get("completion_tokens", 0))
            continue
        response = (result.payload or {}).get("response") or {}
        body = response.get("body") if isinstance(response, dict) else None
        tokens = tokens_of(body.get("usage")) if isinstance(body, dict) else None
        model = (body.get("model") if isinstance(body, dict) else None) or (
            result.models[0] if result.models else "")
        add(model, 1, *(tokens or (0, 0)))
    return counts
