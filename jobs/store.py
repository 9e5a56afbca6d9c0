"""Batch jobs in Redis: OpenAI-style batches and single batch completions, and each line's result.

A job is a Redis hash; each finished line's result is stored once, in the job's `out` (success)
or `err` (failure) hash, by a Lua script that refuses a line already recorded. That is what makes
a redelivered Celery message harmless: it finds its lines done and skips them. The waiting lines
per model (`batch_pending`) are what the autoscaler sees as batch queue depth.

Every job belongs to a project (the tenant of the key that made it), and is listed per project;
jobs stored before projects existed belong to `default` (`adopt_unprojected`).

No Flask or Celery here: the web app and the workers share it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from enum import StrEnum
from typing import NamedTuple

import redis

from jobs.tenancy import DEFAULT_PROJECT, UnknownCursor

KINDS = ("batch", "completion", "eval_run")



class JobStatus(StrEnum):
    """Every status a job may have. A batch: validating → in_progress → finalizing →
    completed (or failed, cancelling → cancelled, expiring → expired); a single completion:
    queued → running → succeeded or failed (or cancelled); an eval run: queued → in_progress →
    completed or failed (or canceled, OpenAI's spelling for runs)."""

    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    EXPIRING = "expiring"
    COMPLETED = "completed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCELED = "canceled"
    EXPIRED = "expired"


# Statuses in which a job's lines are run.
RUNNING_STATUSES = (JobStatus.IN_PROGRESS, JobStatus.RUNNING, JobStatus.QUEUED)
# Statuses in which a job still takes line results. Once it is finalizing or final, a late
# duplicate of a chunk (a redelivered message, a re-sent stalled chunk) must change nothing:
# its results were written out and its counts are final.
OPEN_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.IN_PROGRESS,
                 JobStatus.CANCELLING, JobStatus.EXPIRING)

# KEYS: out, err, job, pending, job's remaining, job's tally. ARGV: now, then five per line:
# line, payload, ok ("1"/"0"), the models it counted against (newline-separated), tally (a JSON
# object of counts to add, or ''). Returns 1 per line stored, 0 per line refused.
_RECORD_LINES = "local open = ' " + " ".join(OPEN_STATUSES) + " '" + """
local status = redis.call('HGET', KEYS[3], 'status') or ''
local stored = {}
if not string.find(open, ' ' .. status .. ' ', 1, true) then
  for i = 2, #ARGV, 5 do table.insert(stored, 0) end
  return stored
end
local completed, failed = 0, 0
for i = 2, #ARGV, 5 do
  local line = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], line) == 1 or redis.call('HEXISTS', KEYS[2], line) == 1 then
    table.insert(stored, 0)
  else
    if ARGV[i + 2] == '1' then
      redis.call('HSET', KEYS[1], line, ARGV[i + 1])
      completed = completed + 1
    else
      redis.call('HSET', KEYS[2], line, ARGV[i + 1])
      failed = failed + 1
    end
    for model in string.gmatch(ARGV[i + 3], '[^\\n]+') do
      if redis.call('HINCRBY', KEYS[4], model, -1) <= 0 then redis.call('HDEL', KEYS[4], model) end
      redis.call('HINCRBY', KEYS[5], model, -1)
    end
    if ARGV[i + 4] ~= '' then
      for field, amount in pairs(cjson.decode(ARGV[i + 4])) do
        redis.call('HINCRBY', KEYS[6], field, amount)
      end
    end
    table.insert(stored, 1)
  end
end
if completed > 0 then redis.call('HINCRBY', KEYS[3], 'completed', completed) end
if failed > 0 then redis.call('HINCRBY', KEYS[3], 'failed', failed) end
if completed + failed > 0 then redis.call('HSET', KEYS[3], 'progress_at', ARGV[1]) end
return stored
"""

# KEYS: job. ARGV: new status, timestamp field, now, allowed statuses...
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
for i = 4, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
    return 1
  end
end
return 0
"""

# KEYS: out, err. ARGV: line numbers. Returns those stored in either.
_DONE_LINES = """
local done = {}
for _, line in ipairs(ARGV) do
  if redis.call('HEXISTS', KEYS[1], line) == 1 or redis.call('HEXISTS', KEYS[2], line) == 1 then
    table.insert(done, line)
  end
end
return done
"""

# KEYS: job, pending, job's remaining. ARGV: new status, timestamp field, now, how many allowed
# statuses, the allowed statuses..., then field/value pairs, then model/count pairs after a '--'.
# A job's lines start waiting (fields set, queue depth added, status moved) in one step or not
# at all: a preparing message delivered twice, or cut short by a dead worker, counts nothing twice.
_START = """
local current = redis.call('HGET', KEYS[1], 'status')
local allowed = false
local n = tonumber(ARGV[4])
for i = 5, 4 + n do
  if current == ARGV[i] then allowed = true end
end
if not allowed then return 0 end
local i = 5 + n
while ARGV[i] ~= '--' do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
i = i + 1
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
return 1
"""

JSON_FIELDS = ("metadata", "errors", "body", "response", "error", "allowed_models", "chunks",
               "data_source", "testing_criteria", "item_schema", "budgets")
INT_FIELDS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
              "expired_at", "cancelling_at", "cancelled_at", "expires_at", "started_at",
              "finished_at", "total", "completed", "failed", "priority", "chunks_total",
              "progress_at")


class LineResult(NamedTuple):
    line: int
    models: list[str]  # the models whose queue depth the line counted in
    ok: bool
    payload: dict  # the result line
    tally: dict[str, int] | None = None


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "gw"):
        self.redis = client
        self.prefix = prefix
        self._record_lines = client.register_script(_RECORD_LINES)
        self._transition = client.register_script(_TRANSITION)
        self._done_lines = client.register_script(_DONE_LINES)
        self._start = client.register_script(_START)

    def key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")

    # -- jobs ----------------------------------------------------------------------------

    def _index(self, kind: str, project: str | None = None) -> str:
        return f"{self.prefix}:jobs:{kind}" + (f":project:{project}" if project else "")

    def create(self, kind: str, owner: str, fields: dict,
               project: str = DEFAULT_PROJECT) -> str:
        """A new job of `kind`, made by the key `owner` of `project`; its id."""
        prefix = {"batch": "batch", "eval_run": "evalrun"}.get(kind, "bcmpl")
        job_id = f"{prefix}_{uuid.uuid4().hex[:24]}"
        now = time.time()
        record = {"id": job_id, "kind": kind, "owner": owner, "project": project,
                  "created_at": int(now), "completed": 0, "failed": 0, **fields}
        pipe = self.redis.pipeline()
        pipe.hset(self.key(job_id), mapping=_encode(record))
        pipe.zadd(self._index(kind), {job_id: now})
        pipe.zadd(self._index(kind, project), {job_id: now})
        pipe.zadd(f"{self.prefix}:jobs:open", {job_id: now})
        pipe.execute()
        return job_id

    def get(self, job_id: str, project: str | None = None) -> dict | None:
        """The job; with `project`, only if it belongs to that project (another tenant's job
        is as good as missing)."""
        if not isinstance(job_id, str) or not job_id:
            return None
        raw = self.redis.hgetall(self.key(job_id))
        if not raw:
            return None
        job = _decode(raw)
        job["project"] = job.get("project") or DEFAULT_PROJECT
        return job if project is None or job["project"] == project else None

    def status(self, job_id: str) -> str | None:
        raw = self.redis.hget(self.key(job_id), "status")
        return raw.decode() if raw else None

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.key(job_id)))

    def open_count(self) -> int:
        """Jobs not yet in a final state."""
        return int(self.redis.zcard(f"{self.prefix}:jobs:open"))

    def migrated(self, name: str) -> bool:
        return bool(self.redis.exists(f"{self.prefix}:migrated:{name}"))

    def mark_migrated(self, name: str) -> None:
        self.redis.set(f"{self.prefix}:migrated:{name}", "1")

    def adopt_unprojected(self) -> int:
        """Give every job stored before projects existed to `default` (idempotent); how many."""
        adopted = 0
        for kind in KINDS:
            scored = self.redis.zrange(self._index(kind), 0, -1, withscores=True)
            pipe = self.redis.pipeline()
            for job_id, _ in scored:
                pipe.hget(self.key(job_id.decode()), "project")
            projects = pipe.execute()
            pipe = self.redis.pipeline()
            for (job_id, score), project in zip(scored, projects, strict=True):
                if project is None:
                    pipe.hset(self.key(job_id.decode()), "project", DEFAULT_PROJECT)
                    pipe.zadd(self._index(kind, DEFAULT_PROJECT), {job_id: score})
                    adopted += 1
            pipe.execute()
        return adopted

    def update(self, job_id: str, **fields) -> None:
        self.redis.hset(self.key(job_id), mapping=_encode(fields))

    def incr(self, job_id: str, field: str, amount: int = 1) -> int:
        return int(self.redis.hincrby(self.key(job_id), field, amount))

    def transition(self, job_id: str, from_statuses: tuple[str, ...], status: str,
                   stamp: str = "") -> bool:
        """Set `status` (and the `stamp` time field) if the job is in one of `from_statuses`."""
        return bool(self._transition(keys=[self.key(job_id)],
                                     args=[status, stamp, int(time.time()), *from_statuses]))

    def list(self, kind: str, project: str | None, after: str | None,
             limit: int) -> tuple[list[dict], bool]:
        """Newest first, of one project (or all); `after` is the last id of the previous page
        (UnknownCursor when it is not one of the list's)."""
        index = self._index(kind, project)
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(index, after)
            if rank is None:
                raise UnknownCursor(after)
            start = rank + 1
        ids = [i.decode() for i in self.redis.zrevrange(index, start, start + limit)]
        jobs = [job for job in (self.get(i) for i in ids[:limit]) if job is not None]
        return jobs, len(ids) > limit

    def open_jobs(self) -> list[dict]:
        """Jobs not yet in a final state (for the expiry and cancel sweep)."""
        ids = self.redis.zrange(f"{self.prefix}:jobs:open", 0, -1)
        return [job for job in (self.get(i.decode()) for i in ids) if job is not None]

    def close(self, job_id: str) -> None:
        """The job reached a final state: leave the open set; give back its unfinished lines'
        share of the queue depth."""
        remaining = self.redis.hgetall(self.key(job_id, "remaining"))
        pipe = self.redis.pipeline()
        for model, count in remaining.items():
            if int(count) > 0:
                pipe.hincrby(f"{self.prefix}:batch_pending", model, -int(count))
        pipe.delete(self.key(job_id, "remaining"))
        pipe.zrem(f"{self.prefix}:jobs:open", job_id)
        pipe.execute()
        # Drop models whose queue went to zero (or below, after a race with a late line).
        for model, count in self.redis.hgetall(f"{self.prefix}:batch_pending").items():
            if int(count) <= 0:
                self.redis.hdel(f"{self.prefix}:batch_pending", model)

    # -- lines ---------------------------------------------------------------------------

    def record_lines(self, job_id: str, results: list[LineResult]) -> list[bool]:
        """Store each line's result once, many lines in one round trip; whether each was stored
        (False: already recorded, or the job no longer takes results). A stored line stops
        counting in the queue depth of each of its models; its `tally` (counts a job kind keeps
        per job, e.g. an eval's passes) is added in the same atomic step."""
        args: list = [int(time.time())]
        for result in results:
            args += [result.line, json.dumps(result.payload), "1" if result.ok else "0",
                     "\n".join(result.models), json.dumps(result.tally) if result.tally else ""]
        stored = self._record_lines(
            keys=[self.key(job_id, "out"), self.key(job_id, "err"), self.key(job_id),
                  f"{self.prefix}:batch_pending", self.key(job_id, "remaining"),
                  self.key(job_id, "tally")],
            args=args)
        return [bool(flag) for flag in stored]

    def result_count(self, job_id: str, which: str) -> int:
        """Results stored of the job: `out` (succeeded) or `err` (failed)."""
        return int(self.redis.hlen(self.key(job_id, which)))

    def result_numbers(self, job_id: str, which: str) -> list[int]:
        """The line numbers of the job's stored results (`out` or `err`)."""
        return [int(n) for n in self.redis.hkeys(self.key(job_id, which))]

    def results(self, job_id: str, which: str, numbers: list[int]) -> list[bytes | None]:
        """The stored results of these lines (`out` or `err`), None where there is none."""
        return self.redis.hmget(self.key(job_id, which), numbers) if numbers else []

    def tally(self, job_id: str) -> dict[str, int]:
        raw = self.redis.hgetall(self.key(job_id, "tally"))
        return {k.decode(): int(v) for k, v in raw.items()}

    def done_lines(self, job_id: str, lines: list[int]) -> set[int]:
        """Those of `lines` whose result is stored."""
        if not lines:
            return set()
        done = self._done_lines(keys=[self.key(job_id, "out"), self.key(job_id, "err")],
                                args=lines)
        return {int(line) for line in done}

    def line_result(self, job_id: str, line: int) -> tuple[bool, dict] | None:
        out = self.redis.hget(self.key(job_id, "out"), line)
        if out is not None:
            return True, json.loads(out)
        err = self.redis.hget(self.key(job_id, "err"), line)
        return (False, json.loads(err)) if err is not None else None

    def iter_results(self, job_id: str, which: str, block: int = 500) -> Iterator[bytes]:
        """The stored result lines (`out` or `err`) in line order, `block` at a time."""
        key = self.key(job_id, which)
        lines = sorted(int(k) for k in self.redis.hkeys(key))
        for start in range(0, len(lines), block):
            part = lines[start:start + block]
            for value in self.redis.hmget(key, part):
                if value is not None:
                    yield value + b"\n"

    def drop_results(self, job_id: str) -> None:
        self.redis.delete(self.key(job_id, "out"), self.key(job_id, "err"),
                          self.key(job_id, "attempts"), self.key(job_id, "chunks"))

    def delete(self, job_id: str) -> None:
        """Forget a job in a final state and all it stored (its indexes too)."""
        job = self.get(job_id)
        if job is None:
            return
        self.close(job_id)
        pipe = self.redis.pipeline()
        pipe.zrem(self._index(job["kind"]), job_id)
        pipe.zrem(self._index(job["kind"], job["project"]), job_id)
        pipe.delete(*(self.key(job_id, part) for part in
                      ("", "out", "err", "attempts", "chunks", "tally", "remaining")))
        pipe.execute()

    def closed_chunks(self, job_id: str) -> set[int]:
        return {int(v) for v in self.redis.smembers(self.key(job_id, "chunks"))}

    def close_chunk(self, job_id: str, start: int) -> bool:
        """Count a chunk as finished, once however often its message is delivered."""
        return bool(self.redis.sadd(self.key(job_id, "chunks"), start))

    def note_attempt(self, job_id: str, line: int) -> int:
        return int(self.redis.hincrby(self.key(job_id, "attempts"), line, 1))

    # -- queue depth for the autoscaler ----------------------------------------------------

    def start(self, job_id: str, from_statuses: tuple[str, ...], status: str, stamp: str,
              fields: dict, pending: dict[str, int]) -> bool:
        """If the job is in one of `from_statuses`: set `fields`, add its lines to the queue
        depth (`pending`, per model) and move it to `status`, all in one step. False (and
        nothing changed) otherwise."""
        args: list = [status, stamp, int(time.time()), len(from_statuses), *from_statuses]
        for name, value in _encode(fields).items():
            args += [name, value]
        args.append("--")
        for model, count in pending.items():
            if count:
                args += [model, count]
        return bool(self._start(keys=[self.key(job_id), f"{self.prefix}:batch_pending",
                                      self.key(job_id, "remaining")], args=args))

    def add_pending(self, job_id: str, counts: dict[str, int]) -> None:
        pipe = self.redis.pipeline()
        for model, count in counts.items():
            if count:
                pipe.hincrby(f"{self.prefix}:batch_pending", model, count)
                pipe.hincrby(self.key(job_id, "remaining"), model, count)
        pipe.execute()

    def pending(self) -> dict[str, int]:
        raw = self.redis.hgetall(f"{self.prefix}:batch_pending")
        return {k.decode(): int(v) for k, v in raw.items() if int(v) > 0}


def _encode(fields: dict) -> dict:
    encoded = {}
    for name, value in fields.items():
        if name in JSON_FIELDS:
            encoded[name] = json.dumps(value)
        elif value is None:
            encoded[name] = ""
        else:
            encoded[name] = str(value)
    return encoded


def _decode(raw: dict) -> dict:
    decoded: dict = {}
    for key, value in raw.items():
        name, text = key.decode(), value.decode()
        if name in JSON_FIELDS:
            decoded[name] = json.loads(text) if text else None
        elif name in INT_FIELDS:
            decoded[name] = int(float(text)) if text else None
        else:
            decoded[name] = text or None
    return decoded
