"""docker-compose.yml's `ha` profile on the real Docker engine: the services on the Sentinels'
URL, and the primary's container killed under realtime calls.

The stack comes up with `--profile ha` and GATEWAY_REDIS_URL naming the three Sentinels (as the
README says), images built here (scripts/compose-local-images.sh, no registry). A realtime demo
call warms an engine; then `redis-primary` is SIGKILLed: the Sentinels (5 s
`down-after-milliseconds`) promote `redis-replica`, the calls meanwhile answer 200 or 503 with
Retry-After, never another status, then 200 again, and a batch demo job submitted after the
failover succeeds; beat sends its ticks again.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import docker
import pytest
import urllib3

from tests.compose_stack import ComposeStack, prepare_local_images
from tests.harness import wait_for

pytestmark = pytest.mark.docker

RUN = uuid.uuid4().hex[:8]
SENTINELS = "sentinel://sentinel-1:26379;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379/0"
REALTIME = {"model": "synquid/gemma-3-27b-it-FP8", "prompt": "hello", "max_tokens": 4}
BATCH = {"model": "mistralai/Mistral-7B-Instruct-v0.1", "prompt": "snow", "max_tokens": 8}



@pytest.fixture(scope="module")
def ha_stack(docker_client, tmp_path_factory):
    prepare_local_images()
    stack = ComposeStack(tmp_path_factory.mktemp("compose-ha"), RUN,
                         ("flower-admin", f"pw-{RUN}"), profiles=("ha",),
                         GATEWAY_REDIS_URL=SENTINELS)
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--build", timeout=1200)
        print(f"compose --profile ha up --build took {time.monotonic() - started:.0f} s")
        wait_for(lambda: stack.status("/healthz") == 200, 180, interval=0.5,
                 what=f"web on {stack.base_url}/healthz\n{stack.logs('web')}")
        yield stack
    finally:
        print(f"--- compose logs (tail) ---\n{stack.logs(tail=30)}")
        stack.remove_leftovers(docker_client)


def _service(stack: ComposeStack, client: docker.DockerClient, name: str):
    [container] = [c for c in stack.containers(client)
                   if c.labels.get("com.docker.compose.service") == name]
    return container


def _master(stack: ComposeStack, client: docker.DockerClient) -> str:
    """The master's name as sentinel-1 gives it ("" when it does not answer)."""
    result = _service(stack, client, "sentinel-1").exec_run(
        ["redis-cli", "-p", "26379", "SENTINEL", "get-master-addr-by-name", "mymaster"])
    return result.output.decode().split("\n")[0].strip() if result.exit_code == 0 else ""


def _beat_sends_to(stack: ComposeStack, client: docker.DockerClient, server: str) -> bool:
    """A connection from beat's container to `server` gave a command in the last 5 s."""
    beat = _service(stack, client, "beat")
    addresses = {n["IPAddress"] for n in beat.attrs["NetworkSettings"]["Networks"].values()}
    listed = _service(stack, client, server).exec_run(["redis-cli", "CLIENT", "LIST"])
    for line in listed.output.decode().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("addr", "").rsplit(":", 1)[0] in addresses and int(fields["idle"]) < 5:
            return True
    return False


def _knows_all(stack: ComposeStack, client: docker.DockerClient, sentinel: str) -> bool:
    result = _service(stack, client, sentinel).exec_run(
        ["redis-cli", "-p", "26379", "SENTINEL", "master", "mymaster"])
    lines = result.output.decode().split("\n")
    fields = dict(zip(lines[0::2], lines[1::2], strict=False))
    return fields.get("num-slaves") == "1" and fields.get("num-other-sentinels") == "2"


def _call(stack: ComposeStack) -> tuple[int, str | None]:
    try:
        response = stack.request("POST", "/v1/completions", "example-realtime-token", REALTIME,
                                 timeout=30)
    except urllib3.exceptions.HTTPError as exc:
        return -1, type(exc).__name__
    return response.status, response.headers.get("Retry-After")


def test_the_primary_container_killed_fails_over_to_the_replica(ha_stack, docker_client):
    stack = ha_stack
    assert _master(stack, docker_client) == "redis-primary"
    # A Sentinel learns of the replica from the primary's INFO (every 10 s) and of the others
    # through it: a primary lost before then has "no good slave" to promote, and the next try
    # is failover-timeout x 2 later.
    wait_for(lambda: all(_knows_all(stack, docker_client, f"sentinel-{i}") for i in (1, 2, 3)),
             60, interval=1, what="Sentinels that know the replica and each other")
    wait_for(lambda: _call(stack)[0] == 200, 120, interval=1,
             what=f"the realtime demo's engine\n{stack.logs('worker-control')}")

    _service(stack, docker_client, "redis-primary").kill()
    killed = time.monotonic()
    calls: list[tuple[float, int, str | None]] = []
    promoted_after = None
    while time.monotonic() - killed < 90:
        status, retry_after = _call(stack)
        calls.append((time.monotonic() - killed, status, retry_after))
        if promoted_after is None and _master(stack, docker_client) == "redis-replica":
            promoted_after = time.monotonic() - killed
        if promoted_after is not None and [c for c in calls if c[0] > promoted_after + 5]:
            break
        time.sleep(0.5)
    assert promoted_after is not None, f"no promotion in 90 s\n{stack.logs('sentinel-1')}"
    statuses = Counter(status for _, status, _ in calls)
    assert set(statuses) <= {200, 503}, (calls, stack.logs("web"))
    assert all(retry_after for _, status, retry_after in calls if status == 503)
    wait_for(lambda: _call(stack)[0] == 200, 30, interval=0.5, what="a call on the new primary")
    # beat could send no tick while there was no master (its log says so); it sends them to
    # the new primary again.
    wait_for(lambda: _beat_sends_to(stack, docker_client, "redis-replica"), 30, interval=1,
             what=f"beat's ticks on the new primary\n{stack.logs('beat')}")

    submitted = stack.request("POST", "/v1/batch/completions", "example-batch-token",
                              {**BATCH, "priority": 1})
    assert submitted.status == 202, submitted.data
    status_url = submitted.json()["status_url"]

    def done():
        job = stack.request("GET", status_url, "example-batch-token").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, 120, interval=1, what=f"the batch job\n{stack.logs('worker-batch')}")
    assert job["status"] == "succeeded", job
    print(f"replica promoted {promoted_after:.1f} s after the kill; calls meanwhile "
          f"{dict(statuses)}")
