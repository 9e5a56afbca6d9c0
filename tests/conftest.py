"""Fixtures shared by the suite: a real Redis, the real stack, keys, and SDK clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import docker
import openai
import pytest
import redis as redis_lib
import urllib3

from runtimes.registry import READY, RuntimeRegistry
from runtimes.tiny_lora import TinyLora, write_adapter_dir
from tests.harness import REPO, RedisServer, Stack, ensure_dockerd, free_port

DATA = Path(__file__).resolve().parent / "data"

TOKENS = {
    "realtime": "example-realtime-token",
    "batch": "example-batch-token",
    "upload": "example-upload-token",
    "eval": "example-eval-token",
    "monitor": "example-monitor-token",
    "all": "example-admin-token",
    "allowlist": "test-allowlist-token",
    "rpm": "test-rpm-token",
    "conc": "test-concurrency-token",
    "batch2": "test-second-batch-token",
    "usage": "test-usage-token",
    "usage_batch": "test-usage-batch-token",
    "budget": "test-budget-token",
    "budget_project": "test-budget-project-token",
    "budget_mixed": "test-budget-mixed-token",
    "fallback": "test-fallback-token",
}
# Keys of a second project ("other"), one per scope: they must never see project default's data.
OTHER_TOKENS = {scope: f"other-project-{scope}-token"
                for scope in ("realtime", "batch", "upload", "eval", "monitor")}


BUDGET_TOKENS = 200  # about ten calls of tests/webapp/test_budgets.py


def keys_document() -> dict:
    keys = [
        {"name": f"test-{scope}", "token": TOKENS[scope], "scopes": [scope]}
        for scope in ("realtime", "batch", "upload", "eval", "monitor")
    ]
    keys += [
        {"name": "test-all", "token": TOKENS["all"],
         "scopes": ["realtime", "batch", "upload", "eval", "monitor"]},
        {"name": "test-allowlist", "token": TOKENS["allowlist"], "scopes": ["realtime"],
         "models": ["sim/fast"]},
        {"name": "test-rpm", "token": TOKENS["rpm"], "scopes": ["realtime"],
         "requests_per_minute": 3},
        {"name": "test-conc", "token": TOKENS["conc"], "scopes": ["realtime"],
         "max_concurrency": 1},
        {"name": "test-batch2", "token": TOKENS["batch2"], "scopes": ["batch"]},
        # Keys of tests/webapp/test_usage_api.py alone, so that their usage is all theirs.
        {"name": "test-usage", "token": TOKENS["usage"], "scopes": ["realtime"]},
        {"name": "test-usage-batch", "token": TOKENS["usage_batch"],
         "scopes": ["batch", "upload"]},
        # tests/webapp/test_budgets.py: a key's own daily budget, and a project's.
        {"name": "test-budget", "token": TOKENS["budget"], "scopes": ["realtime", "monitor"],
         "tokens_per_day": BUDGET_TOKENS, "project": "budgeted"},
        {"name": "test-budget-project", "token": TOKENS["budget_project"],
         "scopes": ["realtime", "batch", "upload"], "project": "budgeted-project"},
        {"name": "test-fallback", "token": TOKENS["fallback"], "scopes": ["realtime"],
         "fallback": True},
        {"name": "test-budget-mixed", "token": TOKENS["budget_mixed"],
         "scopes": ["realtime", "batch", "upload"], "requests_per_day": 4,
         "project": "budget-mixed"},
    ]
    keys += [{"name": f"other-{scope}", "token": token, "scopes": [scope], "project": "other"}
             for scope, token in OTHER_TOKENS.items()]
    return {"keys": keys, "projects": {"budgeted-project": {"requests_per_day": 5}}}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server):
    """A clean Redis database of its own (db 1; the stack uses db 0)."""
    client = redis_lib.Redis.from_url(f"{redis_server.url}/1")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="module")
def docker_client(tmp_path_factory):
    """A Docker engine that answers (started here when we are root), as a docker SDK client;
    never skips (tests/test_compose.py, tests/test_compose_ha.py)."""
    try:
        ensure_dockerd(tmp_path_factory.mktemp("dockerd"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    client = docker.from_env()
    yield client
    client.close()


SIM_IMAGE = "llm-gateway-sim:latest"


@pytest.fixture(scope="session")
def docker_daemon(tmp_path_factory) -> str:
    """A Docker engine that answers (started here when we are root) and the sim engine's image
    built from the tree; never skips. Returns the image tag."""
    try:
        ensure_dockerd(tmp_path_factory.mktemp("dockerd"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    script = str(REPO / "scripts" / "build-sim-image.sh")
    build = subprocess.run([script, SIM_IMAGE], capture_output=True, text=True, timeout=1800)
    if build.returncode == 0 and "--force" in build.stdout:
        # The image predates the current runtimes/sim: test what is in the tree (a cached
        # rebuild takes seconds).
        build = subprocess.run([script, "--force", SIM_IMAGE], capture_output=True, text=True,
                               timeout=1800)
    if build.returncode != 0:
        pytest.fail(f"scripts/build-sim-image.sh failed:\n{build.stdout}\n{build.stderr}")
    return SIM_IMAGE


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "auth.keys.json"
    path.write_text(json.dumps(keys_document()))
    return path


LORA_BASE = "sim/lora"
ADAPTERS = tuple(f"{LORA_BASE}-{name}" for name in ("a", "b", "c"))


UPSTREAM_MODEL = "ext/model"  # served by an engine the stack does not run
UPSTREAM_KEY = "upstream-secret-key"
DEAD_UPSTREAM = "ext/dead"


def catalog_with_adapters(workdir: Path, upstream_port: int | None = None) -> Path:
    """The test catalog plus three LoRA adapters of `sim/lora` (max_loras 2), written here;
    and, given its port, the external engine as an upstream (and one that never answers)."""
    document = json.loads((DATA / "models.test.json").read_text())
    if upstream_port is not None:
        document["models"] += [
            {"id": UPSTREAM_MODEL, "upstream": {
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key_env": "TEST_UPSTREAM_KEY"}},
            {"id": DEAD_UPSTREAM, "upstream": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}},
        ]
    for seed, adapter in enumerate(ADAPTERS, start=1):
        path = write_adapter_dir(workdir / "adapters" / adapter.rsplit("/", 1)[1],
                                 TinyLora(seed=seed))
        document["models"].append({"id": adapter, "base": LORA_BASE, "path": str(path)})
    catalog = workdir / "models.json"
    catalog.write_text(json.dumps(document))
    return catalog


@pytest.fixture(scope="session")
def external_engine(tmp_path_factory):
    """A sim engine the stack does not run (with vLLM's --api-key): a catalog upstream."""
    port = free_port()
    log = (tmp_path_factory.mktemp("external") / "engine.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "runtimes.sim", "--model", UPSTREAM_MODEL, "--port", str(port),
         "--api-key", UPSTREAM_KEY], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 15)
        yield port
    finally:
        process.kill()
        process.wait(10)
        log.close()


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_server, keys_file, external_engine):
    """The web app (2 gevent workers) and a control worker with beat, on the test catalog."""
    workdir = tmp_path_factory.mktemp("stack")
    stack = Stack(
        workdir,
        f"{redis_server.url}/0",
        catalog_with_adapters(workdir, external_engine),
        keys_file,
        TEST_UPSTREAM_KEY=UPSTREAM_KEY,
        RESTART_BACKOFF_SECONDS="0.2",
        BATCH_SWEEP_SECONDS="1",
        BATCH_CHUNK_LINES="50",
        CELERY_VISIBILITY_TIMEOUT="15",
        # A batch with no line done for 10 s has its open chunks sent again: after a worker is
        # killed, recovery does not wait for the broker to give its messages back.
        BATCH_STALL_SECONDS="10",
        MAX_REQUEST_BYTES=str(256 * 1024),
        BATCH_MAX_FILE_BYTES=str(16 * 1024 * 1024),
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(f"\n--- web log (tail) ---\n{stack.tail('web')}")
        print(f"--- worker log (tail) ---\n{stack.tail('worker')}")


@pytest.fixture(scope="session")
def registry(redis_server) -> RuntimeRegistry:
    return RuntimeRegistry(redis_lib.Redis.from_url(f"{redis_server.url}/0"))


def sdk(stack: Stack, token: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0,
                         timeout=kwargs.pop("timeout", 30), **kwargs)


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return sdk(stack, TOKENS["realtime"])


def raw_post(stack: Stack, path: str, body: bytes | dict, token: str | None = "realtime",
             headers: dict | None = None, timeout: float = 30):
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {TOKENS.get(token, token)}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return urllib3.request("POST", f"{stack.base_url}{path}", body=data, headers=all_headers,
                           timeout=timeout, retries=False)


def warm(stack: Stack, model: str, timeout: float = 30, embedding: bool = False) -> dict:
    """Call `model` until its engine is ready; return the first successful completion (the
    first embeddings, for an embedding model)."""
    deadline = time.monotonic() + timeout
    path, body = (("/v1/embeddings", {"model": model, "input": "warm up"}) if embedding else
                  ("/v1/completions", {"model": model, "prompt": "warm up", "max_tokens": 2}))
    while time.monotonic() < deadline:
        response = raw_post(stack, path, body)
        if response.status == 200:
            return response.json()
        assert response.status == 503, response.data
        time.sleep(0.2)
    raise TimeoutError(f"{model} did not become ready in {timeout} s\n{stack.tail('worker')}")


def ready_records(registry: RuntimeRegistry, model: str):
    return [r for r in registry.for_model(model) if r.state == READY]
