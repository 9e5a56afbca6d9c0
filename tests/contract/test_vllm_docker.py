"""The docker backend starts a real vLLM container, as it would on a GPU box.

The image is the CPU build of vLLM made here without a registry (scripts/build-vllm-image.sh,
once; later runs reuse it by its source label), with vllm/vllm-openai's entrypoint convention:
the container's command is appended to `vllm serve`. The model entry is config/models.cpu.json's
own, placed on a (pretend) GPU 0: the command is the one the backend gives the GPU image, and
only the GPU request is left out, because the entry says VLLM_TARGET_DEVICE=cpu. One start, about
a minute; every check is made on it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import docker
import openai
import pytest

from runtimes.backends.docker import CONTAINER_PORT, HF_MOUNT, LABEL_ORCHESTRATOR, DockerBackend
from runtimes.catalog import ModelCatalog
from runtimes.engines import ENGINES
from runtimes.inventory import DEFAULT_DOCKER_URL, GpuHost
from runtimes.tiny_model import TINY_REPOS, TinyModel, write_model
from tests.harness import REPO, wait_for

pytestmark = pytest.mark.docker

VLLM_IMAGE = "llm-gateway-vllm-cpu:0.32.0"
ORCHESTRATOR_ID = f"test-vllm-{os.getpid()}-{uuid.uuid4().hex[:6]}"
MODEL = TINY_REPOS[0]


@pytest.fixture(scope="module")
def vllm_image(docker_daemon, vllm_venv) -> str:
    """The vLLM CPU image, built from the vLLM venv on the base the sim image was built on."""
    build = subprocess.run([str(REPO / "scripts" / "build-vllm-image.sh"), VLLM_IMAGE],
                           capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "VLLM_VENV": str(vllm_venv)})
    if build.returncode != 0:
        pytest.fail(f"scripts/build-vllm-image.sh failed:\n{build.stdout}\n{build.stderr}")
    yield VLLM_IMAGE
    client = docker.from_env()
    for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_ORCHESTRATOR}={ORCHESTRATOR_ID}"}):
        container.remove(force=True)
    client.close()


@pytest.fixture(scope="module")
def cpu_hf_home(tmp_path_factory) -> Path:
    hf_home = tmp_path_factory.mktemp("docker-hf-cache")
    write_model(hf_home, TinyModel(MODEL, seed=1))
    return hf_home


def _exited(backend: DockerBackend) -> bool:
    return any(o.instance_id == "tvllm" and not o.running for o in backend.list())


def test_docker_backend_runs_vllm_with_the_gpu_box_command(vllm_image, cpu_hf_home):
    spec = ModelCatalog.from_file(REPO / "config" / "models.cpu.json", "vllm").get(MODEL)
    engine = ENGINES["vllm"]
    backend = DockerBackend([GpuHost("local", DEFAULT_DOCKER_URL, "127.0.0.1", gpus=(0,))],
                            orchestrator_id=ORCHESTRATOR_ID, hf_home=cpu_hf_home,
                            images={"vllm": vllm_image})
    started = backend.start("tvllm", spec, engine, gpus=(0,))
    try:
        endpoint = f"http://{started.host}:{started.port}"
        try:
            wait_for(lambda: engine.probe(endpoint, MODEL) or _exited(backend), 300,
                     interval=1, what="vLLM ready")
            assert not _exited(backend), "the vLLM container exited"
        except (TimeoutError, AssertionError):
            pytest.fail(f"vLLM container not ready; logs:\n{backend.logs(started.handle, 80)}")

        container = docker.from_env().containers.get(started.handle.split("/", 1)[1])
        config, host_config = container.attrs["Config"], container.attrs["HostConfig"]
        assert config["Entrypoint"] == ["vllm", "serve"]  # vllm/vllm-openai's convention
        # The command the GPU image would get: the engine's argv for a container, as is.
        expected = engine.launch(spec, "0.0.0.0", CONTAINER_PORT, in_container=True).argv
        assert tuple(config["Cmd"]) == expected
        assert expected[:4] == ("--model", MODEL, "--served-model-name", MODEL)
        assert {"--max-num-seqs", "--scheduling-policy", "--enforce-eager"} <= set(expected)
        env = dict(e.split("=", 1) for e in config["Env"])
        assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["HF_HUB_OFFLINE"] == "1"
        assert env["HF_HOME"] == HF_MOUNT and env["VLLM_TARGET_DEVICE"] == "cpu"
        assert not host_config.get("DeviceRequests")  # a CPU build asks Docker for no GPU
        assert host_config["IpcMode"] == "host"

        client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        answer = client.completions.create(model=MODEL, prompt="hello", max_tokens=5)
        assert answer.usage.completion_tokens == 5
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4
        load = engine.load(endpoint)
        assert load is not None and load.running == 0
        (observed,) = [o for o in backend.list() if o.instance_id == "tvllm"]
        assert observed.running and observed.model == MODEL and observed.gpus == (0,)
        assert container.labels["llm-gateway.gpus"] == "0"
    finally:
        backend.stop(started.handle, grace=10)
    assert [o for o in backend.list() if o.instance_id == "tvllm"] == []
