"""Traces from files, for `python -m bench.simulate --trace FILE.csv --models MODELS.json`.

The CSV has a header and one row per request:

- `timestamp`: seconds from the start, or an ISO date-time (then seconds from the first row);
- `model`, `prompt_tokens`, `output_tokens`;
- optionally `kind` (`realtime`, the default, or `batch`), and for batch lines `job` (lines of
  one job share it; required), `priority` (0-9, larger runs sooner, as the API's; default 0) and
  `window_s` (the job's completion window from its first line; default 24 h).

`MODELS.json` is a list of `{"id", "load_seconds", "wake_seconds", "gpus", "weights_gb"}` (and
optionally `kv_cache_gb`), the sizes as the catalog gives them to the placer.

Service time comes from the tokens through a stated engine model (`EngineModel`), not from the
CSV: prompt tokens at the prefill rate, then output tokens at the decode rate of one sequence,
with up to `concurrency` sequences at once per engine. A batch job's lines each take their mean
service time of an engine slot.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bench.sim_trace import BatchJob, Call, SimModel, Trace

DEFAULT_WINDOW_SECONDS = 24 * 3600.0
MAX_PRIORITY = 9


class TraceFileError(ValueError):
    """A trace or models file is malformed; the message names the file and the row."""


@dataclass(frozen=True)
class EngineModel:
    """How long an engine takes for a request: a stated model, the same for every policy.

    The defaults are those of a 7B-30B model in vLLM on one data-centre GPU at moderate
    batch: prefill at 4,000 tokens/s, each sequence decoding 50 tokens/s, 64 at once."""

    prefill_tokens_per_second: float = 4000.0
    decode_tokens_per_second: float = 50.0
    concurrency: int = 64

    def service(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens / self.prefill_tokens_per_second
                + output_tokens / self.decode_tokens_per_second)


def load_models(path: Path) -> tuple[SimModel, ...]:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TraceFileError(f"{path}: {exc}") from None
    if not isinstance(document, list) or not document:
        raise TraceFileError(f"{path}: expected a non-empty JSON list of models")
    models = []
    for index, entry in enumerate(document):
        try:
            models.append(SimModel(
                id=str(entry["id"]),
                load_seconds=float(entry["load_seconds"]),
                wake_seconds=float(entry.get("wake_seconds", 2.0)),
                gpus=int(entry.get("gpus", 1)),
                weights_gb=_optional_float(entry.get("weights_gb")),
                kv_cache_gb=_optional_float(entry.get("kv_cache_gb")),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFileError(f"{path}: model {index}: {exc!r}") from None
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise TraceFileError(f"{path}: model ids must be unique: {ids}")
    return tuple(models)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _seconds(raw: str) -> tuple[float, bool]:
    """(seconds, whether it was a date-time)."""
    try:
        return float(raw), False
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(f"timestamp {raw!r} is neither seconds nor an ISO date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp(), True


def load_trace(trace_path: Path, models_path: Path, *, gpus: int,
               gpu_memory_gb: float | None = None,
               engine: EngineModel = EngineModel()) -> Trace:
    """The trace of `trace_path` on one host with `gpus` GPUs of `gpu_memory_gb` GB each (None:
    unknown, every model takes its GPUs whole)."""
    models = load_models(models_path)
    known = {m.id for m in models}
    rows: list[tuple[float, str, float, dict]] = []
    dated = None
    try:
        with open(trace_path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"timestamp", "model", "prompt_tokens", "output_tokens"} - set(
                reader.fieldnames or ())
            if missing:
                raise TraceFileError(f"{trace_path}: missing columns {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                try:
                    at, is_date = _seconds(row["timestamp"])
                    if dated is None:
                        dated = is_date
                    elif dated != is_date:
                        raise ValueError("timestamps mix seconds and date-times")
                    model = row["model"]
                    if model not in known:
                        raise ValueError(f"model {model!r} is not in {models_path}")
                    service = engine.service(int(row["prompt_tokens"]), int(row["output_tokens"]))
                except (TypeError, ValueError) as exc:
                    raise TraceFileError(f"{trace_path}: row {line}: {exc}") from None
                rows.append((at, model, service, {**row, "_line": line}))
    except OSError as exc:
        raise TraceFileError(f"{trace_path}: {exc.strerror}") from None
    if not rows:
        raise TraceFileError(f"{trace_path}: no rows")
    start = min(r[0] for r in rows) if dated else 0.0
    rows.sort(key=lambda r: r[0])
    calls: list[Call] = []
    lines: dict[str, list[tuple[float, str, float, dict]]] = {}
    for at, model, service, row in rows:
        if (row.get("kind") or "realtime") == "batch":
            if not row.get("job"):
                raise TraceFileError(f"{trace_path}: row {row['_line']}: a batch line needs a job")
            lines.setdefault(row["job"], []).append((at - start, model, service, row))
        elif (row.get("kind") or "realtime") == "realtime":
            calls.append(Call(id=len(calls), model=model, arrival=at - start, service=service))
        else:
            raise TraceFileError(f"{trace_path}: row {row['_line']}: kind is realtime or batch")
    jobs = [_job(trace_path, index, job_lines)
            for index, job_lines in enumerate(sorted(lines.values(), key=lambda j: j[0][0]))]
    last = max([c.arrival for c in calls] + [j.submitted for j in jobs])
    return Trace(
        models=models, calls=tuple(calls), jobs=tuple(jobs), duration=float(math.floor(last) + 1),
        gpu_inventory={"local": tuple(range(gpus))},
        gpu_memory={"local": float(gpu_memory_gb)} if gpu_memory_gb else {},
        concurrency=engine.concurrency, name=Path(trace_path).stem,
    )


def _job(path: Path, index: int, lines: list[tuple[float, str, float, dict]]) -> BatchJob:
    first = lines[0]
    models = {model for _, model, _, _ in lines}
    if len(models) > 1:
        raise TraceFileError(f"{path}: job {first[3]['job']!r} has lines for {sorted(models)}")
    try:
        priority = int(first[3].get("priority") or 0)
        window = float(first[3].get("window_s") or DEFAULT_WINDOW_SECONDS)
    except ValueError as exc:
        raise TraceFileError(f"{path}: row {first[3]['_line']}: {exc}") from None
    if not 0 <= priority <= MAX_PRIORITY:
        raise TraceFileError(f"{path}: row {first[3]['_line']}: priority is 0 to 9")
    return BatchJob(
        id=index, model=first[1], submitted=first[0], lines=len(lines),
        # The simulator orders jobs as Celery's Redis transport does: 0 is the most urgent.
        priority=MAX_PRIORITY - priority, window=window,
        line_seconds=sum(service for _, _, service, _ in lines) / len(lines),
    )
