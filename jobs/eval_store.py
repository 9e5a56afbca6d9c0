"""Eval definitions in Redis, and which runs belong to each eval.

An eval is one JSON value (`gw:eval:<id>`), indexed by creation time for all and per project;
its runs are JobStore jobs (kind `eval_run`), listed per eval in `gw:eval:<id>:runs`. No Flask or
Celery here: the web app and the workers share it.
"""

from __future__ import annotations

import json
import time
import uuid

import redis

from jobs.eval_definitions import full_schema
from jobs.tenancy import DEFAULT_PROJECT, UnknownCursor


def page_ids(client: redis.Redis, index: str, after: str | None, limit: int,
             order: str = "asc") -> tuple[list[str], bool]:
    """Members of a sorted set by score, `limit` after the member `after`, and whether more
    follow. An `after` not in the set is an UnknownCursor."""
    descending = order == "desc"
    start = 0
    if after is not None:
        rank = (client.zrevrank if descending else client.zrank)(index, after)
        if rank is None:
            raise UnknownCursor(after)
        start = rank + 1
    ids = (client.zrevrange if descending else client.zrange)(index, start, start + limit)
    return [i.decode() for i in ids[:limit]], len(ids) > limit


class EvalStore:
    def __init__(self, client: redis.Redis, prefix: str = "gw"):
        self.redis = client
        self.prefix = prefix

    def key(self, eval_id: str, part: str = "") -> str:
        return f"{self.prefix}:eval:{eval_id}" + (f":{part}" if part else "")

    def _index(self, project: str | None) -> str:
        return f"{self.prefix}:evals" + (f":project:{project}" if project else "")

    def create(self, owner: str, parsed: dict, project: str = DEFAULT_PROJECT) -> dict:
        """Store a checked definition (`eval_definitions.parse_eval`); return the record."""
        now = time.time()
        record = {
            "object": "eval", "id": f"eval_{uuid.uuid4().hex[:24]}", "created_at": int(now),
            "name": parsed["name"] or "eval", "metadata": parsed["metadata"],
            "data_source_config": {
                "type": "custom",
                "schema": full_schema(parsed["item_schema"], parsed["include_sample_schema"]),
            },
            "testing_criteria": parsed["testing_criteria"],
            # Kept for checking runs; not part of OpenAI's object.
            "owner": owner, "project": project, "item_schema": parsed["item_schema"],
            "include_sample_schema": parsed["include_sample_schema"],
        }
        pipe = self.redis.pipeline()
        pipe.set(self.key(record["id"]), json.dumps(record))
        pipe.zadd(self._index(None), {record["id"]: now})
        pipe.zadd(self._index(project), {record["id"]: now})
        pipe.execute()
        return record

    def get(self, eval_id: str, project: str | None = None) -> dict | None:
        """The eval; with `project`, only if it belongs to that project."""
        if not isinstance(eval_id, str) or not eval_id:
            return None
        raw = self.redis.get(self.key(eval_id))
        if not raw:
            return None
        record = json.loads(raw)
        record.setdefault("project", DEFAULT_PROJECT)
        return record if project is None or record["project"] == project else None

    def adopt_unprojected(self) -> int:
        """Give every eval stored before projects existed to `default` (idempotent)."""
        adopted = 0
        for eval_id, score in self.redis.zrange(self._index(None), 0, -1, withscores=True):
            raw = self.redis.get(self.key(eval_id.decode()))
            if raw and "project" not in json.loads(raw):
                record = {**json.loads(raw), "project": DEFAULT_PROJECT}
                pipe = self.redis.pipeline()
                pipe.set(self.key(eval_id.decode()), json.dumps(record))
                pipe.zadd(self._index(DEFAULT_PROJECT), {eval_id: score})
                pipe.execute()
                adopted += 1
        return adopted

    def update(self, eval_id: str, **fields) -> dict | None:
        record = self.get(eval_id)
        if record is None:
            return None
        record.update(fields)
        self.redis.set(self.key(eval_id), json.dumps(record))
        return record

    def list(self, project: str | None, after: str | None, limit: int,
             order: str) -> tuple[list[dict], bool]:
        ids, has_more = page_ids(self.redis, self._index(project), after, limit, order)
        return [r for r in (self.get(i) for i in ids) if r is not None], has_more

    def delete(self, eval_id: str) -> None:
        record = self.get(eval_id)
        if record is None:
            return
        pipe = self.redis.pipeline()
        pipe.delete(self.key(eval_id), self.key(eval_id, "runs"))
        pipe.zrem(self._index(None), eval_id)
        pipe.zrem(self._index(record["project"]), eval_id)
        pipe.execute()

    # -- runs of an eval -------------------------------------------------------------------

    def add_run(self, eval_id: str, run_id: str) -> None:
        self.redis.zadd(self.key(eval_id, "runs"), {run_id: time.time()})

    def remove_run(self, eval_id: str, run_id: str) -> None:
        self.redis.zrem(self.key(eval_id, "runs"), run_id)

    def run_ids(self, eval_id: str) -> list[str]:
        return [i.decode() for i in self.redis.zrange(self.key(eval_id, "runs"), 0, -1)]

    def page_runs(self, eval_id: str, after: str | None, limit: int,
                  order: str) -> tuple[list[str], bool]:
        """A page of the eval's run ids by creation time (UnknownCursor for a bad `after`)."""
        return page_ids(self.redis, self.key(eval_id, "runs"), after, limit, order)
