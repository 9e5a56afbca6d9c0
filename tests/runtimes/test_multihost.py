"""Placement across two GPU hosts: two Docker engines on this machine, each with its own socket,
data root and bridge, each with one (pretend) GPU. Two models land on different hosts, a third
finds no room, and the proxy's endpoint for each runtime (the host's address and published port)
answers a real completion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import docker
import pytest
import urllib3

from config.settings import load_settings
from runtimes.factory import build_control_plane
from runtimes.registry import READY
from tests.conftest import SIM_IMAGE
from tests.harness import REPO, wait_for

pytestmark = pytest.mark.docker

BRIDGE = "br-gwtest"


@pytest.fixture(scope="module")
def second_engine(tmp_path_factory, docker_daemon):
    """A second dockerd with its own socket, data root and bridge, holding the sim image."""
    if os.geteuid() != 0:
        pytest.fail("a second Docker engine needs root (as CI has)")
    root = tmp_path_factory.mktemp("dockerd2")
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=False,
                   capture_output=True)
    subprocess.run(["ip", "addr", "add", "172.29.77.1/24", "dev", BRIDGE], check=False,
                   capture_output=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    socket_path = root / "docker.sock"
    with open(root / "dockerd.log", "wb") as log:
        daemon = subprocess.Popen(
            [shutil.which("dockerd"), "--host", f"unix://{socket_path}",
             "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "docker.pid"), "--bridge", BRIDGE,
             # The first engine owns the host's iptables; this one publishes ports through
             # docker-proxy, which reaches its bridge directly.
             "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"unix://{socket_path}"
    client = None
    try:
        client = wait_for(lambda: _client(url), 30, what="the second dockerd")
        saved = subprocess.Popen(["docker", "save", SIM_IMAGE], stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", url, "load", "-q"], stdin=saved.stdout, check=True,
                       capture_output=True)
        saved.wait(timeout=60)
        yield url
    finally:
        for container in client.containers.list(all=True) if client else ():
            container.remove(force=True)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)
        # dockerd leaves its data root mounted (overlay, netns): unmount, deepest first.
        with open("/proc/mounts") as mounts:
            ours = [line.split()[1] for line in mounts if line.split()[1].startswith(str(root))]
        for mount in sorted(ours, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


def _client(url: str):
    try:
        client = docker.DockerClient(base_url=url)
        return client if client.ping() else None
    except docker.errors.DockerException:
        return None


def test_placement_spans_two_hosts_and_never_gives_a_gpu_twice(second_engine, redis_server,
                                                                redis_db, tmp_path):
    catalog = tmp_path / "models.json"
    catalog.write_text(json.dumps({"models": [
        {"id": f"multi/{name}", "engine": "sim", "gpus": 1,
         "engine_args": {"sim": ["--load-seconds", "0.2"]}} for name in ("a", "b", "c")
    ]}))
    orchestrator = f"test-multi-{uuid.uuid4().hex[:8]}"
    hosts = [
        {"name": "gpu-box-1", "url": "unix:///var/run/docker.sock", "address": "127.0.0.1",
         "gpus": [0]},
        {"name": "gpu-box-2", "url": second_engine, "address": "127.0.0.1", "gpus": [0]},
    ]
    settings = load_settings({
        "REDIS_URL": f"{redis_server.url}/1",
        "AUTH_KEYS_FILE": str(REPO / "config" / "example.keys.json"),
        "MODEL_CATALOG_FILE": str(catalog), "RUNTIME_TYPE": "sim", "RUNTIME_BACKEND": "docker",
        "DOCKER_HOSTS": json.dumps(hosts), "ORCHESTRATOR_ID": orchestrator,
    })
    control = build_control_plane(settings)
    assert control.gpu_inventory == {"gpu-box-1": (0,), "gpu-box-2": (0,)}
    try:
        first = control.ensure_running("multi/a")
        second = control.ensure_running("multi/b")
        assert first is not None and second is not None
        assert first.state == READY and second.state == READY
        assert {first.gpu_host, second.gpu_host} == {"gpu-box-1", "gpu-box-2"}
        assert first.gpus == second.gpus == (0,)
        # No GPU left anywhere: a third model is not started on a GPU already given.
        assert control.ensure_running("multi/c") is None
        assert len(control.registry.all()) == 2
        for record in (first, second):
            answer = urllib3.request(
                "POST", f"{record.endpoint}/v1/completions",
                body=json.dumps({"model": record.model, "prompt": "hi", "max_tokens": 2}),
                headers={"Content-Type": "application/json"}, retries=False, timeout=10)
            assert answer.status == 200 and answer.json()["model"] == record.model
        on_second = docker.DockerClient(base_url=second_engine).containers.list(
            filters={"label": f"llm-gateway.orchestrator={orchestrator}"})
        assert len(on_second) == 1
    finally:
        stopped = control.stop_all()
    assert stopped == 2
    time.sleep(0.5)
    for url in ("unix:///var/run/docker.sock", second_engine):
        assert docker.DockerClient(base_url=url).containers.list(
            all=True, filters={"label": f"llm-gateway.orchestrator={orchestrator}"}) == []
