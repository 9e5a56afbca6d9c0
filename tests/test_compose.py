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

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import docker
import pytest
import urllib3

from runtimes.backends.docker import HF_MOUNT, LABEL_MODEL, LABEL_ORCHESTRATOR
from tests.harness import REPO, ensure_dockerd, free_port, wait_for

pytestmark = pytest.mark.docker

RUN = uuid.uuid4().hex[:8]
PROJECT = f"llmgwtest{RUN}"
ORCHESTRATOR_ID = f"compose-test-{RUN}"
NETWORK = f"llm-gw-compose-{RUN}"
IMAGE = "llm-gateway-orchestrator:compose-test"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "llm-gateway-base:bookworm")
REDIS_IMAGE = os.environ.get("REDIS_IMAGE", "llm-gateway-redis:bookworm")
FLOWER_AUTH = ("flower-admin", f"pw-{RUN}")

REALTIME_DEMO = {"model": "synquid/gemma-3-27b-it-FP8", "prompt": "hello", "max_tokens": 16}
BATCH_DEMO = {"model": "mistralai/Mistral-7B-Instruct-v0.1",
              "prompt": "Write a haiku about snow.", "max_tokens": 32, "priority": 1}


def _compose_cli() -> list[str]:
    """The README's `docker-compose` (v1) when installed, else the `docker compose` plugin."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the docker compose plugin is installed "
                "(apt-get install docker-compose)")


def _env_file(example: Path, overrides: dict[str, str]) -> str:
    """The example's lines with `overrides` put in place of its values (new keys at the end)."""
    lines, seen = [], set()
    for line in example.read_text().splitlines():
        key = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and key in overrides:
            line = f"{key}={overrides[key]}"
            seen.add(key)
        lines.append(line)
    lines += [f"{key}={value}" for key, value in overrides.items() if key not in seen]
    return "\n".join(lines) + "\n"


class ComposeStack:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.cli = _compose_cli()
        self.web_port, self.flower_port, self.redis_port = free_port(), free_port(), free_port()
        self.env_path = workdir / "env"
        hf_cache = workdir / "hf-cache"
        hf_cache.mkdir()
        keys = workdir / "auth.keys.json"
        shutil.copy(REPO / "config" / "example.keys.json", keys)  # README step 3
        # What differs from .env.vllm.example: the sim engine on a machine without GPUs, and
        # names and ports of this test's own, so it never meets a real deployment on this host.
        settings = {
            "RUNTIME_TYPE": "sim",
            "RUNTIME_BACKEND": "docker",
            "ORCHESTRATOR_ID": ORCHESTRATOR_ID,
            "RUNTIME_DOCKER_NETWORK": NETWORK,
            "HF_HOME_HOST": str(hf_cache),
            "WEB_PORT": str(self.web_port),
            "FLOWER_PORT": str(self.flower_port),
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "REDIS_PORT": str(self.redis_port),
            "AUTH_KEYS_HOST_FILE": str(keys),
            "BASE_IMAGE": BASE_IMAGE,
            "REDIS_IMAGE": REDIS_IMAGE,
            "ORCHESTRATOR_IMAGE": IMAGE,
        }
        self.env_path.write_text(_env_file(REPO / ".env.vllm.example", settings))  # step 2
        # The same values in the environment, which wins over any env file when compose fills in
        # docker-compose.yml: a variable of the caller's shell must not change the test.
        self.env = {**os.environ, **settings, "ENV_FILE": str(self.env_path),
                    "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
        self.base_url = f"http://127.0.0.1:{self.web_port}"
        self.http = urllib3.PoolManager(retries=False)

    def compose(self, *args: str, timeout: float = 300, check: bool = True):
        argv = [*self.cli, "--env-file", str(self.env_path), "-p", PROJECT,
                "-f", str(REPO / "docker-compose.yml"), *args]
        result = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        with open(self.workdir / "compose.log", "a") as log:
            log.write(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}\n")
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n"
                        f"{result.stderr[-3000:]}")
        return result

    def logs(self, service: str = "", tail: int = 60) -> str:
        args = ["logs", "--no-color", "--tail", str(tail)]
        return self.compose(*args, *([service] if service else []), check=False).stdout

    def request(self, method: str, path: str, token: str | None = None,
                body: dict | None = None, timeout: float = 30):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, f"{self.base_url}{path}", headers=headers,
                                 body=json.dumps(body).encode() if body is not None else None,
                                 timeout=timeout)


def _containers(client: docker.DockerClient, label: str) -> list:
    return client.containers.list(all=True, filters={"label": label}, ignore_removed=True)


def _engines(client: docker.DockerClient) -> list:
    return _containers(client, f"{LABEL_ORCHESTRATOR}={ORCHESTRATOR_ID}")


@pytest.fixture(scope="module")
def docker_client(tmp_path_factory):
    """A Docker engine that answers (started here when we are root); never skips."""
    try:
        ensure_dockerd(tmp_path_factory.mktemp("dockerd"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture(scope="module")
def stack(docker_client, tmp_path_factory):
    """`docker-compose up -d --build` on local images; `down -v` and a sweep at the end."""
    prepare = subprocess.run([str(REPO / "scripts" / "compose-local-images.sh")],
                             capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "BASE_IMAGE": BASE_IMAGE,
                                  "REDIS_IMAGE": REDIS_IMAGE})
    if prepare.returncode != 0:
        pytest.fail(f"scripts/compose-local-images.sh failed:\n{prepare.stdout}\n{prepare.stderr}")
    stack = ComposeStack(tmp_path_factory.mktemp("compose"))
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--build", timeout=1200)
        print(f"compose up --build took {time.monotonic() - started:.0f} s")
        wait_for(lambda: _status(stack, "/healthz") == 200, 120, interval=0.5,
                 what=f"web on {stack.base_url}/healthz\n{stack.logs('web')}")
        yield stack
    finally:
        print(f"--- compose logs (tail) ---\n{stack.logs(tail=40)}")
        stack.compose("down", "-v", "--remove-orphans", "-t", "30", check=False, timeout=300)
        # Whatever a failed test left behind goes now.
        for container in _engines(docker_client) + _containers(
                docker_client, f"com.docker.compose.project={PROJECT}"):
            container.remove(force=True)
        for network in docker_client.networks.list(names=[NETWORK]):
            network.remove()
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


def _status(stack: ComposeStack, path: str) -> int:
    try:
        return stack.request("GET", path, timeout=2).status
    except urllib3.exceptions.HTTPError:
        return 0


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
