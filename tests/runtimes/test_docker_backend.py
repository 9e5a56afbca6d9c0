"""The docker backend against the real Docker engine, with real `sim` engine containers.

A session fixture makes sure dockerd answers (starting it when we are root) and builds the sim
image with scripts/build-sim-image.sh (once; later runs reuse it by tag). Every container of the
session carries a unique ORCHESTRATOR_ID, and the session ends by removing every container with
that label and checking that none is left.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import uuid
from pathlib import Path

import docker
import pytest
import urllib3

from config.settings import load_settings
from runtimes.backends.base import BackendError, Observed
from runtimes.backends.docker import (
    HF_MOUNT,
    LABEL_ORCHESTRATOR,
    DockerBackend,
    hf_snapshot_cached,
)
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.engines import engine_for
from runtimes.factory import make_backend
from runtimes.inventory import DEFAULT_DOCKER_URL, GpuHost
from runtimes.registry import READY, RuntimeRegistry
from tests.conftest import SIM_IMAGE  # built by the docker_daemon fixture
from tests.harness import wait_for

pytestmark = pytest.mark.docker

SESSION = f"test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
ORCHESTRATOR_ID = SESSION
OTHER_ORCHESTRATOR_ID = f"{SESSION}-other"
NETWORK = f"llm-gw-{SESSION}"

CATALOG = {
    "models": [
        {"id": "sim/docker", "engine": "sim", "gpus": 0,
         "engine_args": {"sim": ["--load-seconds", "0.5"]}},
        {"id": "sim/docker-broken", "engine": "sim", "gpus": 0,
         "engine_args": {"sim": ["--load-seconds", "0.2", "--fail-start"]}},
        {"id": "org/name", "engine": "sim", "gpus": 2, "env": {"EXTRA_FLAG": "1"}},
    ]
}


@pytest.fixture(scope="module")
def docker_engine(docker_daemon):
    """The Docker engine with the sim image, and a network of this module's; never skips."""
    client = docker.from_env()
    client.networks.create(NETWORK, labels={LABEL_ORCHESTRATOR: ORCHESTRATOR_ID})
    yield client
    # Whatever a test left behind (a failed assertion skips its own clean-up) goes now.
    for orchestrator in (ORCHESTRATOR_ID, OTHER_ORCHESTRATOR_ID):
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_ORCHESTRATOR}={orchestrator}"}
        ):
            container.remove(force=True)
    client.networks.get(NETWORK).remove()
    client.close()
    left = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label={LABEL_ORCHESTRATOR}={ORCHESTRATOR_ID}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    left += subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter",
         f"label={LABEL_ORCHESTRATOR}={OTHER_ORCHESTRATOR_ID}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert left == [], f"containers left behind: {left}"


@pytest.fixture(scope="session")
def catalog() -> ModelCatalog:
    return ModelCatalog.from_document(CATALOG, "sim")


@pytest.fixture
def hf_home(tmp_path) -> Path:
    path = tmp_path / "hf"
    path.mkdir()
    return path


def local_backend(hf_home: Path, orchestrator_id: str = ORCHESTRATOR_ID, **kwargs):
    return DockerBackend([GpuHost("local", DEFAULT_DOCKER_URL, "127.0.0.1")],
                         orchestrator_id=orchestrator_id, hf_home=hf_home, **kwargs)


@pytest.fixture
def backend(docker_engine, hf_home) -> DockerBackend:
    return local_backend(hf_home)


def new_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def observed(backend: DockerBackend, instance_id: str) -> Observed | None:
    return next((o for o in backend.list() if o.instance_id == instance_id), None)


def docker_ps_all(instance_id: str) -> list[str]:
    """Container ids of an instance as `docker ps -a` shows them (exited ones too)."""
    return subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label=llm-gateway.instance={instance_id}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()


def container_id(handle: str) -> str:
    return handle.split("/", 1)[1]


def wait_ready(engine, endpoint: str, model: str, backend: DockerBackend, handle: str) -> None:
    try:
        wait_for(lambda: engine.probe(endpoint, model), 30, interval=0.1, what=f"{model} ready")
    except TimeoutError:
        pytest.fail(f"{model} not ready at {endpoint}; logs:\n{backend.logs(handle)}")


def wait_exited(backend: DockerBackend, instance_id: str) -> Observed:
    def exited():
        inst = observed(backend, instance_id)
        return inst if inst is not None and not inst.running else None

    return wait_for(exited, 30, interval=0.1, what=f"{instance_id} to exit")


# -- starting, serving, stopping ---------------------------------------------------------------


def test_start_serve_and_stop(backend, catalog):
    spec = catalog.get("sim/docker")
    engine = engine_for(spec)
    instance_id = new_id()
    started = backend.start(instance_id, spec, engine, ())
    assert started.handle.startswith("local/")

    inst = observed(backend, instance_id)
    assert inst is not None and inst.running
    assert (inst.host, inst.port, inst.handle) == ("127.0.0.1", started.port, started.handle)
    assert started.port > 0
    assert (inst.model, inst.engine, inst.fingerprint) == (spec.id, "sim", spec.fingerprint)
    assert inst.gpu_host == "local" and inst.gpus == () and inst.exit_code is None
    assert abs(inst.started_at - time.time()) < 60

    endpoint = f"http://{inst.host}:{inst.port}"
    wait_ready(engine, endpoint, spec.id, backend, started.handle)
    response = urllib3.request(
        "POST", f"{endpoint}/v1/completions", timeout=10, retries=False,
        json={"model": spec.id, "prompt": "Say hello", "max_tokens": 8},
    )
    assert response.status == 200, response.data
    body = response.json()
    assert body["model"] == spec.id
    assert body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 8

    backend.stop(started.handle, grace=5)
    assert docker_ps_all(instance_id) == []
    assert observed(backend, instance_id) is None
    backend.stop(started.handle)  # already gone: not an error
    assert backend.logs(started.handle) == ""


def test_killed_from_outside_is_listed_with_exit_code_and_logs(backend, catalog):
    spec = catalog.get("sim/docker")
    engine = engine_for(spec)
    instance_id = new_id()
    started = backend.start(instance_id, spec, engine, ())
    wait_ready(engine, f"http://{started.host}:{started.port}", spec.id, backend, started.handle)

    subprocess.run(["docker", "kill", container_id(started.handle)], check=True,
                   capture_output=True)
    inst = wait_exited(backend, instance_id)
    assert inst.exit_code == 137  # 128 + SIGKILL
    assert inst.handle == started.handle
    assert "sim engine ready" in backend.logs(started.handle)
    # It stays listed until stop() removes it, so the control plane can record what happened.
    assert observed(backend, instance_id) is not None

    backend.stop(started.handle, grace=1)
    assert docker_ps_all(instance_id) == []


def test_engine_that_fails_to_start_is_listed_exited_with_its_error(backend, catalog):
    spec = catalog.get("sim/docker-broken")
    instance_id = new_id()
    started = backend.start(instance_id, spec, engine_for(spec), ())

    inst = wait_exited(backend, instance_id)
    assert inst.exit_code == 2
    logs = backend.logs(started.handle, tail=10)
    assert "simulated start failure" in logs, logs

    backend.stop(started.handle)
    assert docker_ps_all(instance_id) == []


def test_missing_image_and_unreachable_daemon_are_clear_errors(docker_engine, hf_home, catalog):
    spec = catalog.get("sim/docker")
    missing = local_backend(hf_home, images={"sim": "llm-gateway-sim:no-such-tag"})
    instance_id = new_id()
    with pytest.raises(BackendError, match=r"image llm-gateway-sim:no-such-tag not found on "
                                           r"host local: build it with make sim-image"):
        missing.start(instance_id, spec, engine_for(spec), ())
    assert docker_ps_all(instance_id) == []

    down = DockerBackend([GpuHost("gpu9", "unix:///nonexistent/docker.sock", "127.0.0.1")],
                         orchestrator_id=ORCHESTRATOR_ID)
    with pytest.raises(BackendError, match=r"Docker on host gpu9 .* is not reachable"):
        down.list()
    with pytest.raises(BackendError, match="unknown GPU host 'gpu7'"):
        local_backend(hf_home).start(new_id(), spec, engine_for(spec), (), gpu_host="gpu7")


# -- adoption and isolation ---------------------------------------------------------------------


def test_a_new_backend_adopts_running_containers_by_their_labels(backend, hf_home, catalog):
    spec = catalog.get("sim/docker")
    engine = engine_for(spec)
    instance_id = new_id()
    started = backend.start(instance_id, spec, engine, ())
    wait_ready(engine, f"http://{started.host}:{started.port}", spec.id, backend, started.handle)

    restarted = local_backend(hf_home)  # what an orchestrator restart builds
    inst = observed(restarted, instance_id)
    assert inst is not None and inst.running
    assert (inst.handle, inst.host, inst.port) == (started.handle, started.host, started.port)
    assert (inst.model, inst.fingerprint) == (spec.id, spec.fingerprint)
    assert engine.probe(f"http://{inst.host}:{inst.port}", spec.id)

    restarted.stop(inst.handle, grace=5)
    assert docker_ps_all(instance_id) == []
    assert observed(backend, instance_id) is None


def test_containers_of_another_orchestrator_are_neither_listed_nor_touched(
    backend, hf_home, catalog
):
    spec = catalog.get("sim/docker")
    other = local_backend(hf_home, orchestrator_id=OTHER_ORCHESTRATOR_ID)
    theirs_id, ours_id = new_id(), new_id()
    theirs = other.start(theirs_id, spec, engine_for(spec), ())
    ours = backend.start(ours_id, spec, engine_for(spec), ())

    assert {o.instance_id for o in backend.list()} >= {ours_id}
    assert theirs_id not in {o.instance_id for o in backend.list()}
    assert ours_id not in {o.instance_id for o in other.list()}
    with pytest.raises(BackendError, match="not managed by orchestrator"):
        backend.stop(theirs.handle)
    with pytest.raises(BackendError, match="not managed by orchestrator"):
        backend.logs(theirs.handle)
    backend.stop(theirs_id)  # a bare instance id is looked up among our containers only
    assert observed(other, theirs_id).running

    backend.stop(ours.handle, grace=5)
    other.stop(theirs.handle, grace=5)
    assert docker_ps_all(theirs_id) == [] and docker_ps_all(ours_id) == []


# -- the container spec ---------------------------------------------------------------------------


def test_create_requests_gpus_mounts_the_cache_and_labels_the_container(
    docker_engine, hf_home, catalog
):
    commit = "ab" * 20
    snapshot = hf_home / "hub" / "models--org--name" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (hf_home / "hub" / "models--org--name" / "refs").mkdir()
    (hf_home / "hub" / "models--org--name" / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    assert hf_snapshot_cached(hf_home, "org/name")
    backend = local_backend(hf_home, hf_token="hf_example_token")
    # A vLLM entry (with the local sim image standing in for vLLM's: only created, never run),
    # since the sim engine is told its GPUs instead of asking Docker for devices.
    spec = dataclasses.replace(catalog.get("org/name"), engine="vllm", image=SIM_IMAGE)
    engine = engine_for(spec)
    instance_id = new_id()
    before = time.time()

    container = backend.create(instance_id, spec, engine, gpus=(1, 3))
    try:
        assert container.status == "created"  # created, not started: no GPU needed here
        host_config = container.attrs["HostConfig"]
        [request] = host_config["DeviceRequests"]
        assert request["DeviceIDs"] == ["1", "3"]
        assert request["Capabilities"] == [["gpu"]]
        assert host_config["IpcMode"] == "host"
        assert f"{hf_home}:{HF_MOUNT}:rw" in host_config["Binds"]
        assert host_config["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1",
                                                             "HostPort": ""}]}
        assert host_config["RestartPolicy"]["Name"] in ("", "no")

        config = container.attrs["Config"]
        assert config["Image"] == SIM_IMAGE
        assert config["Cmd"] == list(engine.launch(spec, "0.0.0.0", 8000, in_container=True).argv)
        assert config["Cmd"][:2] == ["--model", "org/name"]
        assert "--served-model-name" in config["Cmd"]
        env = dict(item.split("=", 1) for item in config["Env"])
        assert env["HF_HOME"] == HF_MOUNT
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["HF_TOKEN"] == "hf_example_token"
        assert env["EXTRA_FLAG"] == "1"

        labels = config["Labels"]
        assert labels["llm-gateway.managed-by"] == "llm-gateway-orchestrator"
        assert labels["llm-gateway.orchestrator"] == ORCHESTRATOR_ID
        assert labels["llm-gateway.instance"] == instance_id
        assert labels["llm-gateway.model"] == "org/name"
        assert labels["llm-gateway.engine"] == "vllm"
        assert labels["llm-gateway.fingerprint"] == spec.fingerprint
        assert labels["llm-gateway.gpus"] == "1,3"
        assert labels["llm-gateway.gpu-host"] == "local"
        assert labels["llm-gateway.port"] == "8000"
        assert before - 1 <= float(labels["llm-gateway.started-at"]) <= time.time() + 1
        assert container.name == f"llm-gw-{instance_id}"

        inst = observed(backend, instance_id)
        assert inst is not None and not inst.running and inst.gpus == (1, 3)
    finally:
        backend.stop(f"local/{container.id}", grace=1)
    assert docker_ps_all(instance_id) == []


def test_sim_engine_is_told_its_gpus_without_a_device_request(docker_engine, hf_home, catalog):
    backend = local_backend(hf_home)
    spec = catalog.get("org/name")
    instance_id = new_id()
    container = backend.create(instance_id, spec, engine_for(spec), gpus=(0,))
    try:
        assert not container.attrs["HostConfig"].get("DeviceRequests")
        env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert container.attrs["Config"]["Labels"]["llm-gateway.gpus"] == "0"
    finally:
        backend.stop(f"local/{container.id}", grace=1)


def test_create_with_a_shm_size_and_no_cached_snapshot(docker_engine, hf_home, catalog):
    backend = local_backend(hf_home, shm_size="1g")
    spec = catalog.get("org/name")
    assert not hf_snapshot_cached(hf_home, "org/name")
    instance_id = new_id()
    container = backend.create(instance_id, spec, engine_for(spec), gpus=())
    try:
        host_config = container.attrs["HostConfig"]
        assert host_config["ShmSize"] == 1024**3
        assert host_config["IpcMode"] != "host"
        assert not host_config.get("DeviceRequests")
        env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
        assert "HF_HUB_OFFLINE" not in env and "HF_TOKEN" not in env
    finally:
        backend.stop(instance_id, grace=1)  # by bare instance id
    assert docker_ps_all(instance_id) == []


def test_on_a_docker_network_the_endpoint_is_the_container_name(docker_engine, hf_home, catalog):
    backend = local_backend(hf_home, network=NETWORK)
    spec = catalog.get("sim/docker")
    instance_id = new_id()
    started = backend.start(instance_id, spec, engine_for(spec), ())
    try:
        assert (started.host, started.port) == (f"llm-gw-{instance_id}", 8000)
        inst = observed(backend, instance_id)
        assert (inst.host, inst.port) == (started.host, started.port)
        container = docker_engine.containers.get(container_id(started.handle))
        assert not container.attrs["HostConfig"].get("PortBindings")
        assert NETWORK in container.attrs["NetworkSettings"]["Networks"]
        # A sibling container on that network (as the web app under compose) reaches it by name.
        probe = (
            "import json, time, urllib.request\n"
            "for _ in range(150):\n"
            "    try:\n"
            f"        body = urllib.request.urlopen('http://{started.host}:8000/v1/models')\n"
            "        print(json.load(body)['data'][0]['id']); break\n"
            "    except OSError: time.sleep(0.1)\n"
        )
        output = docker_engine.containers.run(SIM_IMAGE, ["python3", "-c", probe],
                                              network=NETWORK, remove=True)
        assert output.decode().strip() == spec.id
    finally:
        backend.stop(started.handle, grace=5)
    assert docker_ps_all(instance_id) == []


# -- the control plane on the docker backend ------------------------------------------------------


def test_control_plane_starts_through_docker_and_a_restart_adopts(
    docker_engine, redis_db, hf_home, catalog
):
    settings = load_settings({
        "REDIS_URL": "redis://127.0.0.1:6379/0",  # not used: the registry gets redis_db
        "AUTH_KEYS_FILE": "unused.json",
        "RUNTIME_BACKEND": "docker",
        "RUNTIME_TYPE": "sim",
        "ORCHESTRATOR_ID": ORCHESTRATOR_ID,
        "HF_HOME": str(hf_home),
        "GPUS": "",
    })
    backend = make_backend(settings)
    assert isinstance(backend, DockerBackend)
    control = ControlPlane(catalog, RuntimeRegistry(redis_db), backend, stop_grace=5)

    record = control.ensure_running("sim/docker")
    assert record is not None and record.state == READY, control.registry.all()
    assert record.handle.startswith("local/") and record.port > 0
    assert engine_for(catalog.get("sim/docker")).probe(record.endpoint, "sim/docker")
    assert len(docker_ps_all(record.id)) == 1

    # The orchestrator restarts and its registry is gone; the container is still running.
    redis_db.flushdb()
    restarted = ControlPlane(catalog, RuntimeRegistry(redis_db), make_backend(settings),
                             stop_grace=5)
    decisions = restarted.tick()
    assert [(d["action"], d["instance"]) for d in decisions] == [("adopt", record.id)]
    adopted = restarted.registry.get(record.id)
    assert adopted.state == READY  # probed in the same tick
    assert (adopted.handle, adopted.endpoint) == (record.handle, record.endpoint)
    assert adopted.fingerprint == catalog.get("sim/docker").fingerprint
    assert restarted.ensure_running("sim/docker") is None  # already live: no second start
    containers = docker_engine.containers.list(
        all=True, filters={"label": [f"{LABEL_ORCHESTRATOR}={ORCHESTRATOR_ID}",
                                     "llm-gateway.model=sim/docker"]},
    )
    assert [c.labels["llm-gateway.instance"] for c in containers] == [record.id]

    assert restarted.stop_all() == 1
    assert docker_ps_all(record.id) == []
