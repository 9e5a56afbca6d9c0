"""The whole stack with every engine a real container: `RUNTIME_BACKEND=docker RUNTIME_TYPE=sim`.

A cold call starts a sim container through the Docker Engine API, the gateway proxies to its
published port, an idle engine's container is stopped and removed, and `stop-all` leaves none.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import docker
import pytest
import redis as redis_lib

from runtimes.registry import RuntimeRegistry
from tests.conftest import DATA, raw_post, ready_records
from tests.harness import REPO, Stack, wait_for

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def docker_stack(tmp_path_factory, redis_server, keys_file, docker_daemon):
    orchestrator = f"test-stack-{uuid.uuid4().hex[:8]}"
    stack = Stack(tmp_path_factory.mktemp("docker-stack"), f"{redis_server.url}/5",
                  DATA / "models.test.json", keys_file, RUNTIME_BACKEND="docker",
                  ORCHESTRATOR_ID=orchestrator, WEB_CONCURRENCY="1")
    try:
        stack.start()
        yield stack, orchestrator
    finally:
        stack.stop()
        client = docker.from_env()
        for container in client.containers.list(
                all=True, filters={"label": f"llm-gateway.orchestrator={orchestrator}"}):
            container.remove(force=True)


def _ours(orchestrator: str):
    return docker.from_env().containers.list(
        all=True, filters={"label": f"llm-gateway.orchestrator={orchestrator}"})


def test_cold_start_runs_a_container_and_idle_stop_removes_it(docker_stack):
    stack, orchestrator = docker_stack
    registry = RuntimeRegistry(redis_lib.Redis.from_url(stack.env["REDIS_URL"]))
    body = {"model": "sim/idle", "prompt": "hello", "max_tokens": 4}
    first = raw_post(stack, "/v1/completions", body)
    assert first.status == 503 and int(first.headers["Retry-After"]) >= 1
    wait_for(lambda: ready_records(registry, "sim/idle"), 60, what="the container to be ready")
    [container] = _ours(orchestrator)
    assert container.labels["llm-gateway.model"] == "sim/idle"
    answer = raw_post(stack, "/v1/completions", body)
    assert answer.status == 200 and answer.json()["model"] == "sim/idle"
    # sim/idle stops after 2 s idle: the container is stopped and removed.
    wait_for(lambda: not _ours(orchestrator), 30, what="the idle container to be removed")


def test_stop_all_leaves_no_container(docker_stack):  # last: it stops the control worker
    stack, orchestrator = docker_stack
    registry = RuntimeRegistry(redis_lib.Redis.from_url(stack.env["REDIS_URL"]))
    raw_post(stack, "/v1/completions", {"model": "sim/fast", "prompt": "x", "max_tokens": 1})
    wait_for(lambda: ready_records(registry, "sim/fast"), 60, what="a ready container")
    # As `make run` does on the way out: the workers stop first, then the engines.
    stack.stop_process("worker")
    result = subprocess.run([sys.executable, "-m", "runtimes", "stop-all"], env=stack.env,
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert "stopped" in result.stdout
    assert _ours(orchestrator) == []
