"""docker-compose.yml on the real Docker engine, run the way the original README runs it.

The module brings the whole compose stack up once (`up -d --build`, images built here: no
registry), with a unique project name, free host ports, its own ORCHESTRATOR_ID and engine
network, the sim engine and the docker backend. The env file is `.env.vllm.example` with only
those values changed (README step 2), and the keys are `config/example.keys.json` (step 3). The
tests then run the README's demos through the published ports, and the last one stops the stack
and checks that nothing is left: neither compose's containers nor the engines.

The base, sim and redis images come from scripts/compose-local-images.sh (debootstrap + docker
import on the first run; later runs reuse them). The orchestrator image is tagged
llm-gateway-orchestrator:compose-test and kept, so the next run builds from cache in seconds.
"""

from __future__ import annotations

import re
import time
import uuid

import docker
import pytest
import urllib3

from runtimes.backends.docker import HF_MOUNT, LABEL_MODEL, LABEL_ORCHESTRATOR
from tests.compose_stack import ComposeStack, containers, prepare_local_images
from tests.harness import wait_for

pytestmark = pytest.mark.docker

RUN = uuid.uuid4().hex[:8]
PROJECT = f"llmgwtest{RUN}"
ORCHESTRATOR_ID = f"compose-test-{RUN}"
NETWORK = f"llm-gw-compose-{RUN}"
FLOWER_AUTH = ("flower-admin", f"pw-{RUN}")

REALTIME_DEMO = {"model": "synquid/gemma-3-27b-it-FP8", "prompt": "hello", "max_tokens": 16}
BATCH_DEMO = {"model": "mistralai/Mistral-7B-Instruct-v0.1",
              "prompt": "Write a haiku about snow.", "max_tokens": 32, "priority": 1}


def _containers(client: docker.DockerClient, label: str) -> list:
    return containers(client, label)


def _engines(client: docker.DockerClient) -> list:
    return _containers(client, f"{LABEL_ORCHESTRATOR}={ORCHESTRATOR_ID}")



@pytest.fixture(scope="module")
def stack(docker_client, tmp_path_factory):
    """`docker-compose up -d --build` on local images; `down -v` and a sweep at the end."""
    prepare_local_images()
    stack = ComposeStack(tmp_path_factory.mktemp("compose"), RUN, FLOWER_AUTH)
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--build", timeout=1200)
        print(f"compose up --build took {time.monotonic() - started:.0f} s")
        wait_for(lambda: stack.status("/healthz") == 200, 120, interval=0.5,
                 what=f"web on {stack.base_url}/healthz\n{stack.logs('web')}")
        yield stack
    finally:
        print(f"--- compose logs (tail) ---\n{stack.logs(tail=40)}")
        stack.remove_leftovers(docker_client)
        _prune_old_builds(docker_client)


def _prune_old_builds(client: docker.DockerClient) -> None:
    """Each rebuild leaves the previous images untagged (see the labels in the Dockerfile): remove
    them, but keep the newest dependencies stage, the cache that spares the next build PyPI."""
    for label in ("orchestrator", "orchestrator-requirements"):
        client.images.prune(filters={"dangling": True, "label": f"llm-gateway.image={label}"})
    deps = client.images.list(filters={"dangling": True,
                                       "label": "llm-gateway.image=orchestrator-deps"})
    for image in sorted(deps, key=lambda i: i.attrs["Created"])[:-1]:
        try:
            client.images.remove(image.id)
        except docker.errors.APIError:
            pass  # in use by a build running now


def test_realtime_demo_answers_503_with_retry_after_then_200(stack, docker_client):
    first = stack.request("POST", "/v1/completions", "example-realtime-token", REALTIME_DEMO)
    assert first.status == 503, first.data
    assert first.json()["error"]["code"] == "model_starting"
    retry_after = int(first.headers["Retry-After"])
    assert retry_after >= 1

    # As the README says: retry after the delay.
    deadline = time.monotonic() + 120
    while True:
        time.sleep(retry_after)
        response = stack.request("POST", "/v1/completions", "example-realtime-token",
                                 REALTIME_DEMO)
        if response.status == 200:
            break
        assert response.status == 503, response.data
        assert time.monotonic() < deadline, f"no engine after 120 s\n{stack.logs()}"
        retry_after = int(response.headers["Retry-After"])
    completion = response.json()
    assert completion["model"] == REALTIME_DEMO["model"]
    assert completion["choices"][0]["text"]

    # The engine is a container of this orchestrator on the compose network, reached by name:
    # nothing of it is published on the host.
    engines = [c for c in _engines(docker_client)
               if c.labels.get(LABEL_MODEL) == REALTIME_DEMO["model"]]
    assert len(engines) == 1
    engine = engines[0]
    assert list(engine.attrs["NetworkSettings"]["Networks"]) == [NETWORK]
    assert not engine.attrs["HostConfig"].get("PortBindings")
    mounts = {m["Destination"]: m["Source"] for m in engine.attrs["Mounts"]}
    assert mounts[HF_MOUNT] == stack.env["HF_HOME_HOST"]


def test_batch_demo_succeeds(stack):
    submitted = stack.request("POST", "/v1/batch/completions", "example-batch-token", BATCH_DEMO)
    assert submitted.status == 202, submitted.data
    status_url = submitted.json()["status_url"]

    def done():
        job = stack.request("GET", status_url, "example-batch-token").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, 120, interval=1, what=f"the batch job\n{stack.logs('worker-batch')}")
    assert job["status"] == "succeeded", job
    assert job["result"]["choices"][0]["text"]


def test_metrics_sum_what_every_container_counted(stack):
    # The batch line above was counted in worker-batch, the realtime calls in web: one
    # /metrics shows both through the shared `metrics` volume.
    response = stack.request("GET", "/metrics", "example-monitor-token")
    assert response.status == 200, response.data
    text = response.data.decode()
    batch = re.search(r'gateway_batch_lines_total\{[^}]*model="mistralai/Mistral-7B-Instruct-v0.1"'
                      r'[^}]*outcome="completed"[^}]*\} (\S+)', text)
    assert batch and float(batch.group(1)) >= 1, text[:3000]
    assert re.search(r'gateway_requests_total\{[^}]*model="synquid/gemma-3-27b-it-FP8"', text)


def test_health_models_and_flower(stack):
    health = stack.request("GET", "/healthz")
    assert health.status == 200 and health.json()["redis"] == "ok"

    models = stack.request("GET", "/v1/models", "example-realtime-token")
    assert models.status == 200, models.data
    ids = {m["id"] for m in models.json()["data"]}
    assert {REALTIME_DEMO["model"], BATCH_DEMO["model"]} <= ids

    flower = f"http://127.0.0.1:{stack.flower_port}/"
    assert urllib3.request("GET", flower, retries=False, timeout=10).status == 401
    headers = urllib3.make_headers(basic_auth=":".join(FLOWER_AUTH))
    wait_for(lambda: urllib3.request("GET", flower, headers=headers, retries=False,
                                     timeout=10).status == 200, 30, what="flower")
    workers = urllib3.request("GET", f"{flower}api/workers?refresh=1", headers=headers,
                              retries=False, timeout=30).json()
    assert {name.split("@")[0] for name in workers} >= {"batch", "control"}


def test_dashboard_is_served(stack):
    # TODO(issue 6): the dashboard is being built; this holds once /dashboard lands.
    response = stack.request("GET", "/dashboard")
    assert response.status == 200, response.data[:500]
    assert b"<html" in response.data.lower()


def test_stop_and_down_leave_no_container(stack, docker_client):
    running = [c for c in _engines(docker_client) if c.status == "running"]
    assert running, "the demos above should have left engines running"

    # `stop` is what Ctrl-C on `docker-compose up` does: SIGTERM to every service, and
    # worker-control stops the engines it started before it exits. (Our idle keep-alive
    # connections go first: gunicorn would wait its graceful_timeout, 30 s, for them.)
    stack.http.clear()
    started = time.monotonic()
    stack.compose("stop", timeout=300)
    print(f"compose stop took {time.monotonic() - started:.0f} s; exits:", ", ".join(
        f"{c.labels['com.docker.compose.service']} {c.attrs['State']['FinishedAt'][11:22]}"
        for c in _containers(docker_client, f"com.docker.compose.project={PROJECT}")))
    control_log = stack.logs("worker-control", tail=30)
    assert re.search(r"stopped \d+ runtime\(s\)", control_log), control_log
    assert _engines(docker_client) == []

    stack.compose("down", "-v", timeout=300)
    assert _containers(docker_client, f"com.docker.compose.project={PROJECT}") == []
    assert _engines(docker_client) == []
    assert docker_client.networks.list(names=[NETWORK]) == []
