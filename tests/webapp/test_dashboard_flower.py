"""Flower, as `make run` starts it: basic auth, the stack's queues and workers."""

from __future__ import annotations

import base64

import pytest
import urllib3

from tests.harness import VENV_BIN, free_port, wait_for

USER, PASSWORD = "ops", "flower-test-secret"


@pytest.fixture(scope="module")
def flower(stack):
    port = free_port()
    # The same command line as scripts/run-stack.sh.
    stack._spawn("flower", ["env", "-u", "PROMETHEUS_MULTIPROC_DIR",
                            str(VENV_BIN / "celery"), "-A", "tasks.worker", "flower",
                            f"--port={port}", "--address=127.0.0.1",
                            f"--basic-auth={USER}:{PASSWORD}"])
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib3.request("GET", f"{url}/healthcheck", timeout=1,
                                   retries=False).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    try:
        wait_for(up, 60, interval=0.3, what=f"flower\n{stack.tail('flower')}")
        yield url
    finally:
        stack.stop_process("flower")


def _get(url: str, auth: bool = True):
    headers = {}
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return urllib3.request("GET", url, headers=headers, timeout=15, retries=False)


def test_flower_needs_its_basic_auth(flower):
    assert _get(f"{flower}/", auth=False).status == 401
    assert _get(f"{flower}/api/workers", auth=False).status == 401


def test_flower_shows_the_queues_and_workers(stack, flower):
    def workers():
        answer = _get(f"{flower}/api/workers?refresh=1")
        return answer.status == 200 and answer.json()

    found = wait_for(workers, 30, interval=1, what="flower's workers")
    names = {name.split("@")[0] for name in found}
    assert {f"control-{stack.port}", f"batch-{stack.port}"} <= names
    queues = _get(f"{flower}/api/queues/length").json()["active_queues"]
    assert {q["name"] for q in queues} >= {"batch", "control", "downloads"}
    broker = _get(f"{flower}/broker")
    assert broker.status == 200
    for queue in (b"batch", b"control", b"downloads"):
        assert queue in broker.data
    assert _get(f"{flower}/tasks").status == 200
