"""Model storage for real: downloads from a Hub on loopback, the cache on disk, the page cache.

The Hub is `tests.fakehub` (real HTTP, real huggingface_hub `snapshot_download` pointed at it),
serving repos of real safetensors files. Redis is the suite's real server (`redis_db`). Priming
is measured with mincore on files on the real disk (pytest's tmp dir is on ext4, not tmpfs).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.downloads import DONE, REFUSED, DownloadConfig, DownloadError
from runtimes.engines import SimEngine
from runtimes.page_cache import MIN_ESTIMATE_SHARE, cold_start_estimate
from runtimes.registry import READY, RuntimeRecord, RuntimeRegistry
from runtimes.storage import (
    GB,
    RepoCache,
    evict,
    list_cached,
    prime,
    residency,
    resident_bytes,
    select_files,
)
from runtimes.tiny_lora import TinyLora, adapter_files
from runtimes.weight_cache import NotCached, WeightsInUse
from runtimes.weights import ModelWeights, WeightsConfig
from tests.fakehub import FakeHub, FakeRepo, make_model_repo
from tests.harness import REPO, kill_engines, kill_group, wait_for

MB = 1024 * 1024
# What an engine needs of make_model_repo's files: no pickle, no consolidated copy, no card.
NEEDED = {
    "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
}  # fmt: skip


@pytest.fixture
def hub():
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def hf_home(tmp_path) -> Path:
    return tmp_path / "hf"


def _catalog(entries: list[dict]) -> ModelCatalog:
    return ModelCatalog.from_document({"models": entries}, "sim")


def _entry(model: str, repo: str, **extra) -> dict:
    return {"id": model, "hf_repo": repo, "gpus": 0, "download_weights": True,
            "engine_args": {"sim": ["--load-seconds", "0.1"]}, **extra}


@pytest.fixture
def make_weights(redis_db, hf_home, hub):
    def make(entries: list[dict], margin_gb: float = 0.0, token: str | None = None,
             budget: int = 1 * GB) -> ModelWeights:
        config = WeightsConfig(
            DownloadConfig(hf_home, hub.url, token, int(margin_gb * GB)), budget)
        return ModelWeights(config, redis_db, _catalog(entries), RuntimeRegistry(redis_db))

    return make


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- choosing files ------------------------------------------------------------------------------


def test_select_files_takes_safetensors_and_leaves_out_copies():
    repo = make_model_repo("org/pick", shard_mb=0.1)
    index = json.loads(repo.files["model.safetensors.index.json"])
    assert set(select_files(list(repo.files), weight_map=index["weight_map"])) == NEEDED
    # Without the index, the consolidated safetensors copy is all the rule can see as weights.
    assert "consolidated.safetensors" in select_files(list(repo.files))
    # A repo with pickles only gets its pickles.
    assert select_files(["pytorch_model.bin", "config.json", "README.md"]) == [
        "config.json", "pytorch_model.bin"]
    # The catalog's patterns replace the defaults.
    assert select_files(list(repo.files), allow=["*.bin", "config.json"],
                        weight_map=index["weight_map"]) == ["config.json", "pytorch_model.bin"]
    assert "tokenizer.json" not in select_files(list(repo.files), ignore=["tokenizer*"])


# -- downloads -----------------------------------------------------------------------------------


def test_download_fetches_what_the_engine_needs_into_the_cache(hub, hf_home, make_weights):
    repo = hub.add(make_model_repo("org/tiny", shard_mb=2))
    weights = make_weights([_entry("m/tiny", "org/tiny")])
    spec = weights.disk.spec("m/tiny")
    assert not weights.disk.is_local(spec)

    state = weights.downloads.download("m/tiny")

    assert state["status"] == DONE
    assert hub.files_fetched() == NEEDED
    expected_bytes = sum(len(repo.files[p]) for p in NEEDED)
    assert state["bytes_total"] == state["bytes_done"] == expected_bytes
    assert state["commit"] == repo.commit
    cache = RepoCache(hf_home, "org/tiny")
    assert cache.commit_for("main") == repo.commit  # refs/main written
    snapshot = cache.snapshot_dir("main")
    for name in NEEDED:
        assert _sha256(snapshot / name) == hashlib.sha256(repo.files[name]).hexdigest()
    assert not (snapshot / "pytorch_model.bin").exists()
    assert weights.disk.is_local(spec) and cache.missing_files("main") == []
    # The manifest is what "complete" means: a file gone makes the snapshot incomplete.
    (snapshot / "tokenizer.json").unlink()
    assert cache.missing_files("main") == ["tokenizer.json"]
    assert not weights.disk.is_local(spec)


def test_catalog_patterns_choose_the_files(hub, make_weights):
    hub.add(make_model_repo("org/pickled", shard_mb=0.5))
    weights = make_weights([_entry("m/pickled", "org/pickled",
                                   hf_allow_patterns=["*.bin", "*.json"],
                                   hf_ignore_patterns=["tokenizer*"])])
    weights.downloads.download("m/pickled")
    assert hub.files_fetched() == {"pytorch_model.bin", "config.json",
                                   "model.safetensors.index.json"}


def test_a_transfer_cut_mid_file_resumes_with_a_range_request(hub, hf_home, make_weights):
    # huggingface_hub writes 10 MB chunks; a cut after the first chunk resumes from there.
    repo = hub.add(make_model_repo("org/big", shard_mb=24, shards=1))
    shard = "model-00001-of-00001.safetensors"
    hub.cut_once.add(shard)
    weights = make_weights([_entry("m/big", "org/big")])

    assert weights.downloads.download("m/big")["status"] == DONE

    first, second = hub.gets(shard)
    size = len(repo.files[shard])
    assert first.range is None and 0 < first.sent < size  # cut halfway
    assert second.range is not None and second.status == 206
    resumed_at = int(second.range.removeprefix("bytes=").split("-")[0])
    assert resumed_at >= 10 * MB  # not from the start
    assert first.sent + second.sent < 2 * size
    blob = RepoCache(hf_home, "org/big").snapshot_dir("main") / shard
    assert _sha256(blob) == hashlib.sha256(repo.files[shard]).hexdigest()


def test_a_failed_download_asked_again_fetches_only_what_is_missing(hub, make_weights):
    hub.add(make_model_repo("org/flaky", shard_mb=1))
    broken = "model-00002-of-00002.safetensors"
    hub.broken.add(broken)
    weights = make_weights([_entry("m/flaky", "org/flaky")])

    with pytest.raises(DownloadError) as failure:
        weights.downloads.download("m/flaky")
    assert failure.value.transient
    state = weights.downloads.download_state(weights.disk.spec("m/flaky"))
    assert state["status"] == "failed" and "500" in state["error"] and state["transient"]
    fetched_first = {name for name in NEEDED if any(t.status == 200 for t in hub.gets(name))}
    assert broken not in fetched_first and fetched_first

    hub.broken.clear()
    hub.log.clear()
    assert weights.downloads.download("m/flaky")["status"] == DONE
    # Files finished the first time are not fetched again.
    assert hub.files_fetched() == NEEDED - fetched_first
    assert broken in hub.files_fetched()


_DOWNLOAD_SCRIPT = """
import sys
from pathlib import Path
import redis
from runtimes.downloads import DownloadConfig, DownloadRequest, DownloadTracker, download_snapshot
hub_url, hf_home, redis_url = sys.argv[1:4]
download_snapshot(DownloadRequest("m/killed", "org/killed"), DownloadConfig(Path(hf_home), hub_url),
                  DownloadTracker(redis.Redis.from_url(redis_url)))
"""


def test_a_download_whose_worker_died_is_resumed_by_the_next_ask(hub, hf_home, make_weights,
                                                                redis_server):
    hub.add(make_model_repo("org/killed", shard_mb=24, bytes_per_second=8 * MB))
    weights = make_weights([_entry("m/killed", "org/killed")])
    spec = weights.disk.spec("m/killed")
    worker = subprocess.Popen(
        [sys.executable, "-c", _DOWNLOAD_SCRIPT, hub.url, str(hf_home), f"{redis_server.url}/1"],
        cwd=REPO, start_new_session=True)
    try:
        def shards_midway():
            state = weights.downloads.download_state(spec) or {}
            return state.get("status") == "downloading" and (state.get("bytes_done") or 0) > 10 * MB

        wait_for(shards_midway, 20, interval=0.1, what="the download under way")
    finally:
        kill_group(worker, signal.SIGKILL)
    assert weights.downloads.download_state(spec)["status"] == "downloading"  # its lock still lives
    # The lock would expire LOCK_SECONDS after the death; expire it now.
    weights.disk.redis.delete("gw:downloads:lock:org/killed@main",
                         "gw:downloads:requested:org/killed@main")
    assert weights.downloads.download_state(spec)["status"] == "interrupted"
    assert weights.downloads.download_wait_seconds(spec) == 0.0
    small = NEEDED - {n for n in NEEDED if n.endswith(".safetensors")}
    finished = {n for n in NEEDED if any(t.status == 200 and t.sent for t in hub.gets(n))}
    assert small <= finished

    assert weights.prepare_for_start(spec) is False  # not local: it asks for the download again
    assert weights.downloads.download_state(spec)["status"] == "done"  # inline here: no Celery
    for name in small:  # complete before the death: not fetched again
        assert len([t for t in hub.gets(name) if t.status == 200]) == 1, name
    assert weights.disk.is_local(spec)


def test_progress_shows_bytes_rate_and_eta_while_downloading(hub, make_weights):
    # On disk a file grows by huggingface_hub's 10 MB chunks: shards of 24 MB show steps.
    hub.add(make_model_repo("org/slow", shard_mb=24, bytes_per_second=8 * MB))
    weights = make_weights([_entry("m/slow", "org/slow")])
    spec = weights.disk.spec("m/slow")
    runner = threading.Thread(target=weights.downloads.download, args=("m/slow",))
    runner.start()
    try:
        def midway():
            state = weights.downloads.download_state(spec) or {}
            done, total = state.get("bytes_done") or 0, state.get("bytes_total") or 0
            if state.get("status") == "downloading" and state.get("eta_seconds") \
                    and 0.2 * total < done < 0.8 * total:
                return state, weights.downloads.download_wait_seconds(spec)
            return None

        state, wait = wait_for(midway, 20, interval=0.1, what="a download halfway")
    finally:
        runner.join(30)
    # What a cold call would add to its Retry-After.
    assert wait == pytest.approx(state["eta_seconds"], abs=1.0) and wait > 0
    # Two shards at 8 MB/s each, in parallel, seen in 10 MB steps.
    assert 2 * MB < state["rate_bytes_per_second"] < 64 * MB
    assert 0 < state["bytes_done"] < state["bytes_total"]
    remaining = state["bytes_total"] - state["bytes_done"]
    assert state["eta_seconds"] == pytest.approx(remaining / state["rate_bytes_per_second"],
                                                 rel=0.05, abs=0.2)
    final = weights.downloads.download_state(spec)
    assert final["status"] == DONE and final["bytes_done"] == final["bytes_total"]
    assert weights.downloads.download_wait_seconds(spec) == 0.0


def test_asked_twice_at_once_one_download(hub, make_weights):
    hub.add(make_model_repo("org/twice", shard_mb=4, bytes_per_second=2 * MB))
    weights = make_weights([_entry("m/twice", "org/twice")])
    spec = weights.disk.spec("m/twice")
    sent = []
    workers = []

    def request_download(model, for_start):  # what the Celery task would do, in a thread
        sent.append(model)
        worker = threading.Thread(target=weights.downloads.download, args=(model,))
        workers.append(worker)
        worker.start()

    weights.downloads.request_download = request_download
    barrier = threading.Barrier(2)
    answers = []

    def ask():
        barrier.wait()
        answers.append(weights.downloads.ask_download(spec))

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    assert sent == ["m/twice"]
    assert sorted(asked for _, asked in answers) == [False, True]
    # A redelivered task meanwhile finds the download under way and leaves it alone.
    # (The lock is taken a moment before the state leaves "queued": wait for both.)
    downloads = weights.downloads
    wait_for(lambda: downloads.tracker.running(spec.repo_id, None)
             and (downloads.download_state(spec) or {}).get("status") in ("resolving",
                                                                          "downloading"),
             10, what="download running")
    assert weights.downloads.download("m/twice")["status"] in ("resolving", "downloading")
    for worker in workers:
        worker.join(30)
    assert weights.downloads.download_state(spec)["status"] == DONE
    for name in NEEDED:
        assert len([t for t in hub.gets(name) if t.status == 200]) == 1, name


def test_too_little_disk_refuses_with_a_clear_error(hub, make_weights):
    hub.add(make_model_repo("org/huge", shard_mb=1))
    weights = make_weights([_entry("m/huge", "org/huge")], margin_gb=1_000_000)

    with pytest.raises(DownloadError) as refusal:
        weights.downloads.download("m/huge", for_start=True)

    message = str(refusal.value)
    assert refusal.value.status == REFUSED
    assert "not enough disk space" in message and "DOWNLOAD_DISK_MARGIN_GB" in message
    assert "org/huge" in message
    assert not any(p.endswith(".safetensors") for p in hub.files_fetched())
    state = weights.downloads.download_state(weights.disk.spec("m/huge"))
    assert state["status"] == REFUSED and state["error"] == message
    # Asked for by a start, it counts as a failed start with the reason.
    assert weights.registry.failed_starts() == {"m/huge": 1}
    assert "not enough disk space" in weights.registry.last_failure("m/huge")["reason"]


def test_a_gated_repo_needs_the_token(hub, make_weights):
    hub.add(make_model_repo("org/gated", shard_mb=0.5, gated_token="hf_secret"))
    entry = _entry("m/gated", "org/gated")
    with pytest.raises(DownloadError) as refusal:
        make_weights([entry]).downloads.download("m/gated")
    assert "gated" in str(refusal.value) and "HF_TOKEN" in str(refusal.value)

    assert make_weights([entry], token="hf_secret").downloads.download("m/gated")["status"] == DONE
    assert all(t.authorization == "Bearer hf_secret" for t in hub.gets("config.json"))


def test_delete_is_refused_while_a_runtime_uses_the_weights(hub, hf_home, make_weights):
    hub.add(make_model_repo("org/used", shard_mb=1))
    weights = make_weights([_entry("m/used", "org/used")])
    weights.downloads.download("m/used")
    [cached] = list_cached(hf_home)
    assert cached.repo_id == "org/used" and cached.size_bytes > 2 * MB
    record = RuntimeRecord(id="rt-test", model="m/used", engine="sim", backend="process",
                           state=READY, host="127.0.0.1", port=1)
    weights.registry.create(record)

    with pytest.raises(WeightsInUse) as refusal:
        weights.disk.delete("m/used")
    assert "rt-test" in str(refusal.value)
    assert RepoCache(hf_home, "org/used").path.is_dir()

    weights.registry.remove("rt-test")
    deleted = weights.disk.delete("org/used")  # by repo id too
    assert deleted["freed_bytes"] == cached.size_bytes
    assert not RepoCache(hf_home, "org/used").path.exists() and list_cached(hf_home) == []
    with pytest.raises(NotCached):
        weights.disk.delete("m/used")


# -- the page cache ------------------------------------------------------------------------------


def _file_on_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())
    return path


def test_priming_reads_an_evicted_file_back_into_ram(tmp_path):
    path = _file_on_disk(tmp_path / "weights.bin", 64 * MB)
    evict([path])
    size, in_ram = resident_bytes(path)
    assert size == 64 * MB and in_ram / size < 0.05

    report = prime([path], budget_bytes=1 * GB)

    assert residency([path]).fraction > 0.95
    assert report.before.fraction < 0.05 and report.after.fraction > 0.95
    assert report.read_bytes == 64 * MB and report.files_read == 1
    assert report.gb_per_second > 0
    again = prime([path], budget_bytes=1 * GB)
    assert again.files_skipped == 1 and again.read_bytes == 0


def test_priming_stops_at_the_budget(tmp_path):
    first = _file_on_disk(tmp_path / "a.safetensors", 32 * MB)
    second = _file_on_disk(tmp_path / "b.safetensors", 32 * MB)
    evict([first, second])

    report = prime([first, second], budget_bytes=40 * MB)

    assert report.read_bytes == 40 * MB
    assert residency([first]).fraction > 0.95
    assert residency([second]).fraction < 0.5


def test_priming_a_downloaded_model_and_the_estimate_it_gives(hub, hf_home, make_weights):
    hub.add(make_model_repo("org/primed", shard_mb=4))
    weights = make_weights([_entry("m/primed", "org/primed", expected_start_seconds=100)])
    spec = weights.disk.spec("m/primed")
    with pytest.raises(NotCached):
        weights.pages.prime("m/primed")
    weights.downloads.download("m/primed")
    files = RepoCache(hf_home, "org/primed").weight_files("main")
    assert [f.name for f in files] == sorted(f.name for f in files) and len(files) == 2
    evict(files)
    assert weights.pages.measure(spec).fraction < 0.05
    # Nothing in RAM: the catalog's figure stands.
    assert weights.pages.scale_cold_estimate(spec, 100) == 100

    report = weights.pages.prime("m/primed")

    assert report["status"] == "done" and report["after"]["resident_fraction"] > 0.95
    assert weights.pages.prime_state(spec)["status"] == "done"
    # All in RAM: shorter by the disk read it saves (at the assumed 1 GB/s: 8 MB, a little).
    assert weights.pages.scale_cold_estimate(spec, 100) < 100


def test_cold_start_estimate_by_bytes_and_residency():
    assert cold_start_estimate(240, 30 * GB, 0.0, 1 * GB) == 240
    assert cold_start_estimate(240, 30 * GB, 1.0, 1 * GB) == 210
    assert cold_start_estimate(240, 30 * GB, 0.5, 2 * GB) == 232.5
    # Never below a share of the figure: an engine does more than read weights.
    assert cold_start_estimate(20, 30 * GB, 1.0, 1 * GB) == 20 * MIN_ESTIMATE_SHARE


# -- engines and the control plane ---------------------------------------------------------------


def _engine_env(state_dir: Path, instance_id: str) -> dict[str, str]:
    pid = json.loads((state_dir / f"{instance_id}.json").read_text())["pid"]
    # The wrapper shell's child is the engine; the wrapper's own environment is the same.
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_sim_loads_from_the_cache_offline_and_refuses_without_it(hub, hf_home, make_weights,
                                                                 tmp_path):
    hub.add(make_model_repo("org/engine", shard_mb=1))
    weights = make_weights([_entry("m/engine", "org/engine")])
    spec = weights.disk.spec("m/engine")
    backend = ProcessBackend(tmp_path / "rt", base_env={"HF_HOME": str(hf_home)})
    engine = SimEngine()
    argv = engine.argv(spec, "h", 1, in_container=False)
    assert argv[argv.index("--hf-repo") + 1] == "org/engine"
    try:
        # Not in the cache: the sim, like vLLM offline, will not start.
        started = backend.start("rt-missing", spec, engine, ())
        assert "HF_HUB_OFFLINE" not in _engine_env(tmp_path / "rt", "rt-missing")
        wait_for(lambda: not backend.list()[0].running, 15, what="sim refusing")
        assert backend.list()[0].exit_code == 2
        assert "does not exist" in backend.logs(started.handle)
        backend.stop(started.handle)

        weights.downloads.download("m/engine")
        started = backend.start("rt-cached", spec, engine, ())
        wait_for(lambda: engine.probe(f"http://{started.host}:{started.port}", spec.id), 15,
                 what="sim ready on the cached snapshot")
        assert _engine_env(tmp_path / "rt", "rt-cached")["HF_HUB_OFFLINE"] == "1"
    finally:
        for inst in backend.list():
            backend.stop(inst.handle, grace=2)
        kill_engines(tmp_path / "rt")


def test_the_control_plane_downloads_before_it_starts(hub, hf_home, redis_db, make_weights,
                                                      tmp_path):
    hub.add(make_model_repo("org/cold", shard_mb=1))
    weights = make_weights([_entry("m/cold", "org/cold")])
    control = ControlPlane(weights.disk.catalog, weights.registry,
                           ProcessBackend(tmp_path / "rt", base_env={"HF_HOME": str(hf_home)}),
                           start_timeout=30)
    control.weights = weights  # its download runs inline: no Celery here
    try:
        # Not cached: the first ask fetches the weights and starts nothing.
        assert control.ensure_running("m/cold") is None
        assert weights.disk.is_local(weights.disk.spec("m/cold"))
        assert control.registry.all() == []
        started_at = time.monotonic()
        record = control.ensure_running("m/cold")
        assert record is not None and record.state == READY
        assert time.monotonic() - started_at < 15
        assert weights.disk.redis.hget("gw:weights:last_used", "org/cold") is not None
        remembered = weights.pages.remembered_residency(weights.disk.spec("m/cold"))
        assert remembered["weight_bytes"] > 2 * MB
    finally:
        control.stop_all()
        kill_engines(tmp_path / "rt")


def test_a_base_of_hub_adapters_starts_once_they_are_downloaded_too(hub, hf_home, make_weights):
    """An adapter from the Hub downloads with its base, before the base starts: the engine
    loads it from its HF cache by repo id on the adapter's first call."""
    hub.add(make_model_repo("org/base", shard_mb=0.5))
    lora = hub.add(FakeRepo("org/base-lora", {name: data for name, data in adapter_files(
        TinyLora(seed=3)).items()}))
    weights = make_weights([_entry("m/base", "org/base"),
                            {"id": "m/base-lora", "base": "m/base", "hf_repo": "org/base-lora"},
                            {"id": "m/local-lora", "base": "m/base", "path": "/adapters/x"}])
    base = weights.disk.catalog.get("m/base")
    assert weights.prepare_for_start(base) is False  # both were asked for, inline here
    adapter = weights.disk.spec("m/base-lora")
    assert (adapter.repo_id, adapter.download_weights) == ("org/base-lora", True)
    assert weights.disk.is_local(base) and weights.disk.is_local(adapter)
    snapshot = RepoCache(hf_home, "org/base-lora").snapshot_dir("main")
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(lora.files)
    assert weights.prepare_for_start(base) is True
    # A local adapter has nothing to fetch.
    assert weights.disk.catalog.weights_spec("m/local-lora") is None
