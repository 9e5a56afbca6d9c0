"""The GPU host inventory and the settings of the docker backend: parsing, defaults, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.settings import SettingsError, load_settings
from runtimes import inventory
from runtimes.backends.base import BackendError
from runtimes.backends.docker import DEFAULT_IMAGES, DockerBackend, hf_snapshot_cached
from runtimes.catalog import ModelCatalog
from runtimes.inventory import (
    DEFAULT_DOCKER_URL,
    GpuHost,
    TlsFiles,
    gpu_memory,
    gpus_by_host,
    load_inventory,
    parse_gpu_memory,
)

BASE = {"REDIS_URL": "redis://127.0.0.1:6379/0", "AUTH_KEYS_FILE": "keys.json"}
HOSTS = [
    {"name": "gpu1", "url": "tcp://gpu1.internal:2376", "address": "10.0.0.11", "gpus": [0, 1],
     "tls": {"ca": "/certs/ca.pem", "cert": "/certs/cert.pem", "key": "/certs/key.pem"}},
    {"name": "gpu2", "url": "tcp://gpu2.internal:2376", "address": "gpu2.internal",
     "gpus": [0, 1, 2, 3]},
]


def settings(**env):
    return load_settings({**BASE, **env})


def test_defaults_are_one_local_host():
    s = settings(GPUS="")
    assert s.docker_host == DEFAULT_DOCKER_URL
    assert (s.docker_hosts, s.runtime_docker_network, s.runtime_shm_size) == ((), None, None)
    assert (s.hf_home_host, s.orchestrator_id) == (None, "default")
    [host] = load_inventory(s)
    assert host == GpuHost("local", DEFAULT_DOCKER_URL, "127.0.0.1", ())
    assert host.bind_address == "127.0.0.1"


def test_unset_gpus_means_ask_nvidia_smi():
    assert settings().gpus is None
    assert settings(GPUS="0, 2,3").gpus == (0, 2, 3)


def test_docker_hosts_inline_and_from_a_file(tmp_path):
    inline = settings(RUNTIME_BACKEND="docker", DOCKER_HOSTS=json.dumps(HOSTS), GPUS="7")
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(HOSTS))
    from_file = settings(RUNTIME_BACKEND="docker", DOCKER_HOSTS=str(path))
    assert inline.docker_hosts == from_file.docker_hosts
    gpu1, gpu2 = load_inventory(inline)  # GPUS is for the default host only
    assert gpu1.tls == TlsFiles("/certs/ca.pem", "/certs/cert.pem", "/certs/key.pem")
    assert gpu2.tls is None
    assert (gpu1.bind_address, gpu2.bind_address) == ("10.0.0.11", "0.0.0.0")
    assert gpus_by_host([gpu1, gpu2]) == {"gpu1": (0, 1), "gpu2": (0, 1, 2, 3)}


def test_the_process_backend_is_one_local_host_whatever_docker_hosts_say():
    s = settings(RUNTIME_BACKEND="process", DOCKER_HOSTS=json.dumps(HOSTS), GPUS="0,1",
                 RUNTIME_HOST="127.0.0.2")
    assert [(h.name, h.address, h.gpus) for h in load_inventory(s)] == [
        ("local", "127.0.0.2", (0, 1))
    ]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("GPUS", "0,x", "GPU ids"),
        ("GPUS", "1,1", "twice"),
        ("DOCKER_HOSTS", "[", "not valid JSON"),
        ("DOCKER_HOSTS", "[]", "non-empty"),
        ("DOCKER_HOSTS", "/no/such/hosts.json", "cannot read"),
        ("DOCKER_HOSTS", '[{"name": "a", "url": "tcp://a:2376"}]', "address"),
        ("DOCKER_HOSTS", '[{"name": "a/b", "url": "tcp://a:2376", "address": "a"}]', "name"),
        ("DOCKER_HOSTS", '[{"name": "a", "url": "http:/a", "address": "a"}]', "Docker URL"),
        ("DOCKER_HOSTS", '[{"name": "a", "url": "tcp://a:1", "address": "a", "gpus": ["0"]}]',
         "gpus"),
        ("DOCKER_HOSTS", '[{"name": "a", "url": "tcp://a:1", "address": "a", "colour": 1}]',
         "colour"),
        ("DOCKER_HOSTS", '[{"name": "a", "url": "tcp://a:1", "address": "a", '
                         '"tls": {"cert": "/c.pem"}}]', "cert and key"),
        ("DOCKER_HOSTS", '[{"name": "a", "url": "tcp://a:1", "address": "a"}, '
                         '{"name": "a", "url": "tcp://b:1", "address": "b"}]', "unique"),
        ("DOCKER_HOST", "/var/run/docker.sock", "Docker URL"),
        ("RUNTIME_SHM_SIZE", "16 GB", "16g"),
        ("HF_HOME_HOST", "relative/cache", "absolute"),
        ("ORCHESTRATOR_ID", "two words", "ORCHESTRATOR_ID"),
    ],
)
def test_a_malformed_value_names_its_variable(name, value, says):
    with pytest.raises(SettingsError, match=name) as caught:
        settings(**{name: value})
    assert says in str(caught.value)


def test_backend_from_settings(tmp_path):
    s = settings(RUNTIME_BACKEND="docker", RUNTIME_TYPE="vllm", RUNTIME_IMAGE="vllm-openai:patched",
                 HF_HOME=str(tmp_path / "cache"), HF_HOME_HOST="/srv/hf", HF_TOKEN="hf_x",
                 RUNTIME_SHM_SIZE="16g", RUNTIME_DOCKER_NETWORK="gw", ORCHESTRATOR_ID="blue",
                 GPUS="0,1")
    backend = DockerBackend.from_settings(s)
    assert (backend.orchestrator_id, backend.network, backend.shm_size) == ("blue", "gw", "16g")
    assert backend.hf_home_host == Path("/srv/hf")
    assert backend.hosts["local"].gpus == (0, 1)
    catalog = ModelCatalog.from_document(
        {"models": [{"id": "a/b"}, {"id": "c/d", "engine": "sglang"},
                    {"id": "e/f", "image": "mine:1"}]}, "vllm")
    # RUNTIME_IMAGE is the default engine's image; an entry's own image wins over both.
    assert backend.image_for(catalog.get("a/b")) == "vllm-openai:patched"
    assert backend.image_for(catalog.get("c/d")) == DEFAULT_IMAGES["sglang"]
    assert backend.image_for(catalog.get("e/f")) == "mine:1"
    # No HF_HOME_HOST: the cache is mounted from HF_HOME itself.
    plain = DockerBackend.from_settings(settings(HF_HOME=str(tmp_path / "cache")))
    assert plain.hf_home_host == tmp_path / "cache"


COMMIT = "c0ffee" * 6 + "c0ff"  # a commit id: 40 hex digits


def test_snapshot_in_cache(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    assert not hf_snapshot_cached(tmp_path, "org/name")
    (repo / "snapshots").mkdir(parents=True)
    assert not hf_snapshot_cached(tmp_path, "org/name")  # the download never got a file in
    (repo / "snapshots" / COMMIT).mkdir()
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    assert not hf_snapshot_cached(tmp_path, "org/name")  # a config but no weights yet
    (repo / "snapshots" / COMMIT / "model.safetensors").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(f"{COMMIT}\n")
    assert hf_snapshot_cached(tmp_path, "org/name")
    assert hf_snapshot_cached(tmp_path, "org/name", "main")
    assert hf_snapshot_cached(tmp_path, "org/name", COMMIT)
    assert not hf_snapshot_cached(tmp_path, "org/name", "v2")


def test_missing_tls_files_are_named_as_such(tmp_path):
    host = GpuHost("gpu1", "tcp://127.0.0.1:1", "127.0.0.1",
                   tls=TlsFiles(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "cert.pem"),
                                key=str(tmp_path / "key.pem")))
    with pytest.raises(BackendError, match="host gpu1: bad TLS settings"):
        DockerBackend([host]).list()


# ---------------------------------------------------------------- GPU memory


def test_gpu_memory_gb_sets_every_hosts_gpus():
    s = settings(GPUS="0,1", GPU_MEMORY_GB="80")
    assert s.gpu_memory_gb == 80.0
    assert gpu_memory(s, load_inventory(s)) == {"local": 80.0}
    hosts = settings(RUNTIME_BACKEND="docker", DOCKER_HOSTS=json.dumps(HOSTS),
                     GPU_MEMORY_GB="48")
    assert gpu_memory(hosts, load_inventory(hosts)) == {"gpu1": 48.0, "gpu2": 48.0}


def test_without_gpus_there_is_no_memory_to_share():
    s = settings(GPUS="", GPU_MEMORY_GB="80")
    assert gpu_memory(s, load_inventory(s)) == {}


def test_nvidia_smi_memory_is_read_in_mib_and_the_smallest_gpu_counts(monkeypatch):
    # What `nvidia-smi --query-gpu=index,memory.total --format=csv,noheader,nounits` prints.
    assert parse_gpu_memory("0, 81559\n1, 40960\n") == {0: pytest.approx(79.6, abs=0.1),
                                                         1: 40.0}
    monkeypatch.setattr(inventory, "detect_gpu_memory", lambda: {0: 79.6, 1: 40.0})
    s = settings(GPUS="0,1")
    assert gpu_memory(s, load_inventory(s)) == {"local": 40.0}
    # A GPU nvidia-smi does not report: the memory is not known, engines take GPUs whole.
    s = settings(GPUS="0,2")
    assert gpu_memory(s, load_inventory(s)) == {}


def test_a_bad_gpu_memory_is_named():
    with pytest.raises(SettingsError, match="GPU_MEMORY_GB"):
        settings(GPU_MEMORY_GB="lots")
