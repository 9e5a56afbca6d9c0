"""The policy's memory decisions in the real system: the web app, a control worker with beat,
and real sim engine processes, on one (pretend) GPU of 24 GB (`GPUS=0`, `GPU_MEMORY_GB=24`).

The catalog (`tests/data/models.memory.json`) sizes them as a GPU box's would be; the small
models load in 2.5 s, longer than a wake-up is estimated (2 s), since for an engine that restarts
faster than it wakes a stop is the cheaper eviction, and the policy would take it. Two small
models (10 GB each, awake) run side by side on that GPU, each told its share of it;
a hot model kept busy is not evicted for a rarely called one that does not fit beside it: the
rare model's callers get an honest 503 with Retry-After until the hot one goes quiet and
sleeps, keeping only its context, and the rare one then starts beside it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib

from runtimes.registry import READY, SLEEPING, RuntimeRegistry
from tests.conftest import DATA, raw_post, warm
from tests.harness import Stack

CATALOG = DATA / "models.memory.json"
SLEEP_AFTER = 3.0


@pytest.fixture(scope="module")
def memory_stack(tmp_path_factory, redis_server, keys_file):
    workdir = tmp_path_factory.mktemp("memory-stack")
    redis_url = f"{redis_server.url}/7"
    redis_lib.Redis.from_url(redis_url).flushdb()
    stack = Stack(workdir, redis_url, CATALOG, keys_file, GPUS="0", GPU_MEMORY_GB="24",
                  SLEEP_AFTER_SECONDS=str(SLEEP_AFTER), RESTART_BACKOFF_SECONDS="0.2",
                  WEB_CONCURRENCY="1")
    try:
        stack.start_web()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()
        print(f"\n--- worker log (tail) ---\n{stack.tail('worker', 80)}")


@pytest.fixture(scope="module")
def registry7(redis_server) -> RuntimeRegistry:
    return RuntimeRegistry(redis_lib.Redis.from_url(f"{redis_server.url}/7"))


def engine_argv(stack: Stack) -> dict[str, list[str]]:
    """Each engine process's command line, by the model it serves."""
    out = {}
    for pid in stack.engine_pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--model" in argv:
            out[argv[argv.index("--model") + 1]] = argv
    return out


def live(registry: RuntimeRegistry, model: str, state: str = READY):
    return [r for r in registry.for_model(model) if r.state == state]


def test_two_small_models_run_side_by_side_on_one_gpu_each_told_its_share(memory_stack,
                                                                         registry7):
    for model in ("mem/small-a", "mem/small-b"):
        warm(memory_stack, model)
    # Both loaded on the GPU: ready, or (on a slow machine, the first one warmed) asleep after
    # SLEEP_AFTER seconds, which keeps its context there.
    records = [r for m in ("mem/small-a", "mem/small-b")
               for r in live(registry7, m) + live(registry7, m, SLEEPING)]
    assert len(records) == 2
    assert {(r.gpu_host, r.gpus) for r in records} == {("local", (0,))}  # the same GPU
    argv = engine_argv(memory_stack)
    for model in ("mem/small-a", "mem/small-b"):
        flag = argv[model].index("--gpu-memory-utilization")
        # 6 GB of weights, 2 of KV cache, 2 of overhead: 10 of 24 GB.
        assert argv[model][flag + 1] == "0.42"


def test_a_hot_model_is_not_evicted_for_a_rare_one_until_it_goes_quiet(memory_stack,
                                                                      registry7):
    warm(memory_stack, "mem/hot")  # the small ones, idle, are put to sleep for it
    busy = threading.Event()
    busy.set()
    answered = []

    def hammer():
        while busy.is_set():
            response = raw_post(memory_stack, "/v1/completions",
                                {"model": "mem/hot", "prompt": "hi", "max_tokens": 2})
            answered.append(response.status)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        refusals = []
        deadline = time.monotonic() + 8.0  # sixteen autoscaler passes
        while time.monotonic() < deadline:
            response = raw_post(memory_stack, "/v1/completions",
                                {"model": "mem/rare", "prompt": "hi", "max_tokens": 2})
            assert response.status == 503, response.data
            refusals.append(response)
            time.sleep(0.5)
        assert all(r.json()["error"]["code"] == "model_starting" for r in refusals)
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refusals)
        assert live(registry7, "mem/hot"), "the hot model was evicted while busy"
        assert not registry7.for_model("mem/rare")
    finally:
        busy.clear()
        for thread in threads:
            thread.join(timeout=30)
    assert set(answered) == {200}
    decisions = registry7.recent_decisions(500)
    assert not [d for d in decisions if "evicted for mem/rare" in d["reason"]]

    # Quiet, the hot model sleeps after SLEEP_AFTER_SECONDS (its context stays on the GPU),
    # and the rare one starts in the memory it gave up.
    answer = warm(memory_stack, "mem/rare", timeout=60)
    assert answer["model"] == "mem/rare"
    assert live(registry7, "mem/hot", SLEEPING)
    (rare,) = live(registry7, "mem/rare")
    assert rare.gpus == (0,)
    assert rare.meta["memory_fraction"] == 0.59  # 10 + 2 + 2 of 24 GB
    slept = [d for d in decisions + registry7.recent_decisions(50)
             if d["model"] == "mem/hot" and d["action"] in ("sleep", "stop", "drain")]
    assert slept and all(d["action"] == "sleep" for d in slept)  # never stopped


def test_an_asleep_model_wakes_only_once_its_memory_is_free_again(memory_stack, registry7):
    """small-a sleeps beside the others; awake again it needs 10 GB, which mem/rare holds: the
    wake is refused until the autoscaler evicts rare (idle, so cheap; it restarts faster than it
    would wake, so it is stopped), then small-a wakes in place, the same engine as before."""
    (asleep,) = live(registry7, "mem/small-a", SLEEPING)
    assert live(registry7, "mem/rare")
    answer = warm(memory_stack, "mem/small-a", timeout=60)
    assert answer["model"] == "mem/small-a"
    (woken,) = live(registry7, "mem/small-a")
    assert woken.id == asleep.id  # woken, not started afresh
    assert not live(registry7, "mem/rare")
    decisions = registry7.recent_decisions(100)
    assert [d for d in decisions if d["model"] == "mem/rare" and d["action"] in ("sleep", "stop")
            and "evicted for mem/small-a" in d["reason"]]
    assert "no room to wake" in memory_stack.log_path("worker").read_text()
