"""The model storage API and cold starts that download first, through a real stack.

A stack of its own (gunicorn + a Celery control/downloads worker with beat, on Redis db 3) runs
with `HF_ENDPOINT` pointing at `tests.fakehub` on loopback and `HF_HOME` in a temporary folder,
so downloads are real huggingface_hub downloads into a real cache, and engines are real `sim`
processes that load the snapshot from that cache (`download_weights` in the catalog).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis as redis_lib
import urllib3

from runtimes.registry import RuntimeRegistry
from runtimes.storage import RepoCache, evict, residency
from tests.conftest import TOKENS, raw_post, ready_records, warm
from tests.fakehub import FakeHub, make_model_repo
from tests.harness import REPO, Stack, wait_for

MB = 1024 * 1024
NEEDED = {
    "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
}  # fmt: skip


def _hub_entry(model: str, repo: str, **extra) -> dict:
    return {"id": model, "hf_repo": repo, "download_weights": True, "gpus": 0,
            "expected_start_seconds": 3, "engine_args": {"sim": ["--load-seconds", "0.3"]},
            **extra}


CATALOG = {"models": [
    _hub_entry("hub/tiny", "testorg/tiny"),
    _hub_entry("hub/twice", "testorg/twice"),
    _hub_entry("hub/slow", "testorg/slow"),
    _hub_entry("hub/primed", "testorg/primed"),
    _hub_entry("hub/later", "testorg/later"),
    {"id": "sim/plain", "gpus": 0, "engine_args": {"sim": ["--load-seconds", "0.2"]}},
]}


@pytest.fixture(scope="module")
def hub():
    hub = FakeHub().start()
    hub.add(make_model_repo("testorg/tiny", shard_mb=1))
    hub.add(make_model_repo("testorg/twice", shard_mb=4, bytes_per_second=2 * MB))
    # Slow enough to be seen downloading: 2 x 24 MB at 6 MB/s each.
    hub.add(make_model_repo("testorg/slow", shard_mb=24, bytes_per_second=6 * MB))
    hub.add(make_model_repo("testorg/primed", shard_mb=4))
    hub.add(make_model_repo("testorg/later", shard_mb=8, bytes_per_second=4 * MB))
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def models_stack(tmp_path_factory, redis_server, keys_file, hub):
    workdir = tmp_path_factory.mktemp("models-stack")
    catalog = workdir / "models.json"
    catalog.write_text(json.dumps(CATALOG))
    redis_url = f"{redis_server.url}/3"
    redis_lib.Redis.from_url(redis_url).flushdb()
    stack = Stack(workdir, redis_url, catalog, keys_file, HF_ENDPOINT=hub.url,
                  HF_HOME=str(workdir / "hf"), WEB_CONCURRENCY="1", RESTART_BACKOFF_SECONDS="0.2")
    try:
        stack.start_web()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()
        print(f"\n--- web log (tail) ---\n{stack.tail('web')}")
        print(f"--- worker log (tail) ---\n{stack.tail('worker', 80)}")


@pytest.fixture(scope="module")
def registry3(redis_server) -> RuntimeRegistry:
    return RuntimeRegistry(redis_lib.Redis.from_url(f"{redis_server.url}/3"))


def _call(stack, method: str, path: str, token: str | None = "upload"):
    headers = {"Authorization": f"Bearer {TOKENS.get(token, token)}"} if token else {}
    return urllib3.request(method, f"{stack.base_url}{path}", headers=headers, retries=False,
                           timeout=30)


def _wait_download(stack, model: str, timeout: float = 60) -> dict:
    def finished():
        state = _call(stack, "GET", f"/v1/models/{model}/download").json()
        return state if state["status"] in ("done", "failed", "refused") else None

    return wait_for(finished, timeout, interval=0.2, what=f"download of {model}")


def _cached(stack) -> dict[str, dict]:
    response = _call(stack, "GET", "/v1/models/cache")
    assert response.status == 200, response.data
    return {row["repo_id"]: row for row in response.json()["data"]}


def test_download_answers_202_then_shows_progress_and_the_cache(models_stack, hub):
    response = _call(models_stack, "POST", "/v1/models/hub/tiny/download")
    assert response.status == 202, response.data
    accepted = response.json()
    assert accepted["object"] == "model.download" and accepted["status"] == "queued"
    assert accepted["status_url"] == "/v1/models/hub/tiny/download"
    assert response.headers["Location"] == accepted["status_url"]

    done = _wait_download(models_stack, "hub/tiny")

    repo = hub.repos["testorg/tiny"]
    assert done["status"] == "done", done
    assert done["bytes_done"] == done["bytes_total"] == sum(len(repo.files[p]) for p in NEEDED)
    assert done["progress"] == 1.0 and done["commit"] == repo.commit
    assert hub.files_fetched() >= NEEDED and "pytorch_model.bin" not in hub.files_fetched()
    row = _cached(models_stack)["testorg/tiny"]
    assert row["models"] == ["hub/tiny"] and row["in_use_by"] == []
    assert row["size_bytes"] >= done["bytes_total"]
    assert row["revisions"] == [{"commit": repo.commit, "refs": ["main"], "files": len(NEEDED),
                                 "complete": True}]
    assert row["last_used_at"] is not None and row["residency"]["weight_bytes"] > 2 * MB
    # The realtime model list is still the realtime model list.
    listing = _call(models_stack, "GET", "/v1/models", token="realtime")
    assert listing.status == 200
    assert {m["id"] for m in listing.json()["data"]} == {m["id"] for m in CATALOG["models"]}
    # Reads are open to `monitor`; downloads are not.
    assert _call(models_stack, "GET", "/v1/models/cache", token="monitor").status == 200
    assert _call(models_stack, "POST", "/v1/models/hub/tiny/download",
                 token="monitor").status == 403


@pytest.mark.parametrize(("method", "path", "token", "status", "code"), [
    ("POST", "/v1/models/no/such-model/download", "upload", 404, "model_not_found"),
    ("POST", "/v1/models/hub/tiny/download", "realtime", 403, "insufficient_scope"),
    ("GET", "/v1/models/cache", None, 401, "missing_api_key"),
    ("GET", "/v1/models/sim/plain/download", "upload", 404, "download_not_found"),
    ("DELETE", "/v1/models/cache/sim/plain", "upload", 404, "model_not_cached"),
    ("POST", "/v1/models/sim/plain/prime", "upload", 409, "model_not_cached"),
    ("GET", "/v1/models/sim/plain/prime", "upload", 404, "prime_not_found"),
])
def test_errors_are_openai_shaped(models_stack, method, path, token, status, code):
    response = _call(models_stack, method, path, token=token)
    assert response.status == status, response.data
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error


def test_two_requests_at_once_make_one_download(models_stack, hub):
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(
            lambda _: _call(models_stack, "POST", "/v1/models/hub/twice/download"), range(2)))
    assert [a.status for a in answers] == [202, 202]
    assert {a.json()["status_url"] for a in answers} == {"/v1/models/hub/twice/download"}
    assert _wait_download(models_stack, "hub/twice")["status"] == "done"
    for name in NEEDED:
        fetched = [t for t in hub.gets(name) if "testorg/twice" in t.path and t.status == 200]
        assert len(fetched) == 1, name


def _engine_argv_and_env(stack, record_id: str) -> tuple[list[str], dict[str, str]]:
    wrapper = json.loads((stack.state_dir / f"{record_id}.json").read_text())["pid"]
    env = dict(item.decode().split("=", 1)
               for item in Path(f"/proc/{wrapper}/environ").read_bytes().split(b"\0")
               if b"=" in item)
    children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
    argv = Path(f"/proc/{children[0]}/cmdline").read_bytes().decode().split("\0")
    return argv, env


def test_a_cold_call_downloads_first_and_retry_after_includes_the_eta(models_stack, hub,
                                                                      registry3):
    model = "hub/slow"
    first = raw_post(models_stack, "/v1/completions",
                     {"model": model, "prompt": "hi", "max_tokens": 2})
    assert first.status == 503 and first.json()["error"]["code"] == "model_starting"

    def downloading():
        state = _call(models_stack, "GET", f"/v1/models/{model}/download")
        if state.status != 200:
            return None
        state = state.json()
        return state if state["status"] == "downloading" and state["eta_seconds"] else None

    state = wait_for(downloading, 20, interval=0.1, what="the download under way")
    assert not registry3.for_model(model)  # no GPUs held while the weights come
    during = raw_post(models_stack, "/v1/completions",
                      {"model": model, "prompt": "hi", "max_tokens": 2})
    after = _call(models_stack, "GET", f"/v1/models/{model}/download").json()
    assert during.status == 503
    error = during.json()["error"]
    assert error["code"] == "model_starting" and "downloading its weights" in error["message"]
    retry_after = int(during.headers["Retry-After"])
    # The catalog's 3 s for the engine, plus what is left of the download.
    etas = [s["eta_seconds"] for s in (state, after) if s["eta_seconds"] is not None]
    assert 3 + 1 <= retry_after <= 3 + int(max(etas)) + 2, (retry_after, etas)

    body = warm(models_stack, model, timeout=60)
    assert body["choices"]
    [record] = ready_records(registry3, model)
    argv, env = _engine_argv_and_env(models_stack, record.id)
    assert argv[argv.index("--hf-repo") + 1] == "testorg/slow"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].endswith("hf")
    assert _call(models_stack, "GET", f"/v1/models/{model}/download").json()["status"] == "done"


def test_the_autoscaler_sees_weights_missing_then_downloading_then_here(models_stack):
    """What the policy is told, so that it evicts nothing for a model that cannot start yet."""
    from config.settings import load_settings
    from runtimes.factory import build_control_plane

    model = "hub/later"
    control = build_control_plane(load_settings({k: v for k, v in models_stack.env.items()
                                                 if k.isupper()}))
    assert control.weights is not None

    def seen(asked: set[str]) -> dict:
        # What `snapshot()` adds for the models asked for (realtime or batch demand); called
        # with the demand given here, so this stack's autoscaler is not asked to start it.
        return control.weights_not_ready(control.registry.all(), asked)

    assert seen(set()) == {"weights_missing": frozenset(), "downloading": frozenset()}
    assert seen({model}) == {"weights_missing": {model}, "downloading": frozenset()}
    assert _call(models_stack, "POST", f"/v1/models/{model}/download").status == 202
    assert wait_for(lambda: seen({model})["downloading"] == {model}, 20, interval=0.05,
                    what="the download to be seen")
    assert seen({model})["weights_missing"] == {model}
    assert _wait_download(models_stack, model)["status"] == "done"
    assert seen({model}) == {"weights_missing": frozenset(), "downloading": frozenset()}


def _stop_runtimes(stack, model: str) -> None:
    from config.settings import load_settings
    from runtimes.factory import build_control_plane

    control = build_control_plane(load_settings({k: v for k, v in stack.env.items()
                                                 if k.isupper()}))
    # A call answered 503 from a stale route just before the engine was ready leaves demand
    # behind; the autoscaler would start the model again for it.
    control.registry.clear_demand(model)
    for record in control.registry.for_model(model):
        control.stop_instance(record.id, "stopped by the test")


def test_delete_is_refused_while_a_runtime_uses_the_model(models_stack, registry3):
    warm(models_stack, "hub/tiny", timeout=30)  # downloaded by the first test
    [record] = ready_records(registry3, "hub/tiny")
    refused = _call(models_stack, "DELETE", "/v1/models/cache/hub/tiny")
    assert refused.status == 409
    error = refused.json()["error"]
    assert error["code"] == "model_in_use" and record.id in error["message"]
    assert _cached(models_stack)["testorg/tiny"]["in_use_by"] == [record.id]

    _stop_runtimes(models_stack, "hub/tiny")
    wait_for(lambda: not registry3.for_model("hub/tiny"), 10, what="no runtime of hub/tiny")
    deleted = _call(models_stack, "DELETE", "/v1/models/cache/hub/tiny")
    assert deleted.status == 200, deleted.data
    assert deleted.json()["deleted"] is True and deleted.json()["freed_bytes"] > 2 * MB
    assert "testorg/tiny" not in _cached(models_stack)
    assert not (models_stack.workdir / "hf" / "hub" / "models--testorg--tiny").exists()


def test_prime_through_the_api_and_the_command_line(models_stack):
    model = "hub/primed"
    assert _call(models_stack, "POST", f"/v1/models/{model}/download").status == 202
    assert _wait_download(models_stack, model)["status"] == "done"
    files = RepoCache(models_stack.workdir / "hf", "testorg/primed").weight_files("main")
    evict(files)
    assert residency(files).fraction < 0.05

    response = _call(models_stack, "POST", f"/v1/models/{model}/prime")
    assert response.status == 202, response.data
    assert response.json()["status_url"] == f"/v1/models/{model}/prime"

    def primed():
        state = _call(models_stack, "GET", f"/v1/models/{model}/prime").json()
        return state if state["status"] in ("done", "failed") else None

    state = wait_for(primed, 30, interval=0.2, what="priming")
    assert state["status"] == "done", state
    assert state["before"]["resident_fraction"] < 0.05
    assert state["after"]["resident_fraction"] > 0.95 and state["read_bytes"] >= 8 * MB
    assert state["residency"]["resident_fraction"] > 0.95
    assert residency(files).fraction > 0.95

    evict(files)
    env = {k: v for k, v in models_stack.env.items() if k.isupper()}
    run = subprocess.run([sys.executable, "-m", "runtimes", "prime", model], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["status"] == "done" and report["after"]["resident_fraction"] > 0.95
    assert residency(files).fraction > 0.95
    assert subprocess.run([sys.executable, "-m", "runtimes", "prime", "no/such"], cwd=REPO,
                          env=env, capture_output=True, timeout=60).returncode == 2

