"""docker-compose.yml brought up for a test: a project, ports, engine network and
ORCHESTRATOR_ID of the test's own, the env file made from `.env.vllm.example` as the README's
step 2 says, the sim engine and the docker backend.

Used by tests/test_compose.py (the default services) and tests/test_compose_ha.py (the `ha`
profile); the images come from scripts/compose-local-images.sh (no registry needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import docker
import pytest
import urllib3

from runtimes.backends.docker import LABEL_ORCHESTRATOR
from tests.harness import REPO, free_port

IMAGE = "llm-gateway-orchestrator:compose-test"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "llm-gateway-base:bookworm")
REDIS_IMAGE = os.environ.get("REDIS_IMAGE", "llm-gateway-redis:bookworm")


def compose_cli() -> list[str]:
    """The README's `docker-compose` (v1) when installed, else the `docker compose` plugin."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the docker compose plugin is installed "
                "(apt-get install docker-compose)")


def env_file_text(example: Path, overrides: dict[str, str]) -> str:
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


def prepare_local_images() -> None:
    prepare = subprocess.run([str(REPO / "scripts" / "compose-local-images.sh")],
                             capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "BASE_IMAGE": BASE_IMAGE,
                                  "REDIS_IMAGE": REDIS_IMAGE})
    if prepare.returncode != 0:
        pytest.fail(f"scripts/compose-local-images.sh failed:\n{prepare.stdout}\n{prepare.stderr}")


class ComposeStack:
    def __init__(self, workdir: Path, run: str, flower_auth: tuple[str, str],
                 profiles: tuple[str, ...] = (), **settings: str):
        self.workdir = workdir
        self.cli = compose_cli()
        self.project = f"llmgwtest{run}"
        self.orchestrator_id = f"compose-test-{run}"
        self.network = f"llm-gw-compose-{run}"
        self.profiles = profiles
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
            "ORCHESTRATOR_ID": self.orchestrator_id,
            "RUNTIME_DOCKER_NETWORK": self.network,
            "HF_HOME_HOST": str(hf_cache),
            "WEB_PORT": str(self.web_port),
            "FLOWER_PORT": str(self.flower_port),
            "FLOWER_BASIC_AUTH": ":".join(flower_auth),
            "REDIS_PORT": str(self.redis_port),
            "AUTH_KEYS_HOST_FILE": str(keys),
            "BASE_IMAGE": BASE_IMAGE,
            "REDIS_IMAGE": REDIS_IMAGE,
            "ORCHESTRATOR_IMAGE": IMAGE,
            **settings,
        }
        self.env_path.write_text(env_file_text(REPO / ".env.vllm.example", settings))  # step 2
        # The same values in the environment, which wins over any env file when compose fills in
        # docker-compose.yml: a variable of the caller's shell must not change the test.
        self.env = {**os.environ, **settings, "ENV_FILE": str(self.env_path),
                    "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
        self.base_url = f"http://127.0.0.1:{self.web_port}"
        self.http = urllib3.PoolManager(retries=False)

    def compose(self, *args: str, timeout: float = 300, check: bool = True):
        profiles = [arg for name in self.profiles for arg in ("--profile", name)]
        argv = [*self.cli, "--env-file", str(self.env_path), "-p", self.project,
                "-f", str(REPO / "docker-compose.yml"), *profiles, *args]
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

    def status(self, path: str) -> int:
        """The status of a GET, 0 when the connection fails."""
        try:
            return self.request("GET", path, timeout=2).status
        except urllib3.exceptions.HTTPError:
            return 0

    def containers(self, client: docker.DockerClient) -> list:
        """This project's containers, running or not."""
        return containers(client, f"com.docker.compose.project={self.project}")

    def engines(self, client: docker.DockerClient) -> list:
        """The engine containers this stack's orchestrator started."""
        return containers(client, f"{LABEL_ORCHESTRATOR}={self.orchestrator_id}")

    def remove_leftovers(self, client: docker.DockerClient) -> None:
        """`down -v`, then whatever a failed test left behind: containers and the network."""
        self.compose("down", "-v", "--remove-orphans", "-t", "30", check=False, timeout=300)
        for container in self.engines(client) + self.containers(client):
            container.remove(force=True)
        for network in client.networks.list(names=[self.network]):
            network.remove()


def containers(client: docker.DockerClient, label: str) -> list:
    return client.containers.list(all=True, filters={"label": label}, ignore_removed=True)
