"""Redis restarted with its append-only file in the middle of a batch: every accepted job still
completes. A stack of its own, on a Redis of its own with AOF on."""

from __future__ import annotations

import io
import json

import pytest

from tests.conftest import DATA, TOKENS, sdk
from tests.harness import RedisServer, Stack, wait_for


@pytest.fixture(scope="module")
def aof_stack(tmp_path_factory, keys_file):
    workdir = tmp_path_factory.mktemp("aof")
    server = RedisServer(workdir / "redis", appendonly=True).start()
    stack = Stack(workdir / "stack", f"{server.url}/0", DATA / "models.test.json", keys_file,
                  RESTART_BACKOFF_SECONDS="0.2", BATCH_CHUNK_LINES="20",
                  CELERY_VISIBILITY_TIMEOUT="15", WEB_CONCURRENCY="1",
                  BATCH_SWEEP_SECONDS="1", BATCH_STALL_SECONDS="10")
    try:
        stack.start()
        yield stack, server
    finally:
        stack.stop()
        server.stop()


def test_jobs_survive_a_redis_restart(aof_stack):
    stack, server = aof_stack
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "sim/slowbatch", "prompt": f"{i}", "max_tokens": 1}}
             for i in range(200)]
    uploader, client = sdk(stack, TOKENS["upload"]), sdk(stack, TOKENS["batch"])
    uploaded = uploader.files.create(
        file=("in.jsonl", io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))),
        purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, 90,
             interval=0.2, what="the batch to be under way")

    server.stop()  # SIGTERM: Redis writes its AOF and exits; the stack loses its store
    server.start()  # same port, same directory: the AOF brings everything back

    def finished():
        try:
            current = client.batches.retrieve(batch.id)
        except Exception:  # the web app may answer 500 while it reconnects
            return None
        return current if current.status in ("completed", "failed") else None

    done = wait_for(finished, 180, interval=0.5, what="the batch after the restart")
    assert done.status == "completed"
    assert done.request_counts.completed == 200 and done.request_counts.failed == 0
    ids = [json.loads(x)["custom_id"] for x in
           client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200))
