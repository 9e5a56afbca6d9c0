"""docker-compose.yml's `ha` profile, read as compose reads it (`docker-compose config`, no
Docker engine needed): the default `up` is unchanged, and the profile adds a primary, a replica
and three Sentinels that the services use when GATEWAY_REDIS_URL names them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.harness import REPO

HA = {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
SENTINELS = "sentinel://sentinel-1:26379;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379/0"


def _config(tmp_path, *args: str, **env: str) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    env_file = tmp_path / "env"
    env_file.write_text("")
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    done = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), *args,
                           "config"], capture_output=True, text=True, timeout=60,
                          env={**environ, "ENV_FILE": str(env_file), **env})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_the_default_up_has_no_ha_service_and_uses_redis(tmp_path):
    services = _config(tmp_path)["services"]
    assert all(services[name].get("profiles") == ["ha"] for name in HA)
    assert {name for name, s in services.items() if not s.get("profiles")} == {
        "redis", "web", "worker-batch", "worker-control", "beat", "flower"}
    assert services["web"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_the_ha_profile_points_the_services_at_the_sentinels(tmp_path):
    services = _config(tmp_path, "--profile", "ha", GATEWAY_REDIS_URL=SENTINELS)["services"]
    for name in ("web", "worker-batch", "worker-control", "beat", "flower"):
        assert services[name]["environment"]["REDIS_URL"] == SENTINELS
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis-primary", "6379"]
    assert all("appendonly" in " ".join(services[n]["command"])
               for n in ("redis-primary", "redis-replica"))
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][-1]
        assert "sentinel monitor mymaster redis-primary 6379 2" in script
        assert "--sentinel" in script
