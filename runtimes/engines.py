"""Inference engines: how to launch each one and how to tell that it is ready.

An `Engine` knows its command line (as a child process, or as the arguments of its container
image), its readiness probe and whether it has vLLM's sleep mode. The backends decide where the
command runs; the engine decides what runs.

Readiness is the same test for all three: the port answers, `GET /health` is 200 (SGLang answers
503 while it warms up; vLLM binds its port only once loaded) and `GET /v1/models` lists the served
model name.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import urllib3
from prometheus_client.parser import text_string_to_metric_families

from runtimes.catalog import EMBEDDING, ModelSpec

_probe_pool = urllib3.PoolManager(num_pools=64, maxsize=2, retries=False)


@dataclass(frozen=True)
class EngineLoad:
    """What an engine's `/metrics` says about its queue."""

    waiting: float = 0.0
    running: float = 0.0
    cache_usage: float = 0.0


@dataclass(frozen=True)
class Launch:
    """What a backend needs to run one engine instance."""

    argv: tuple[str, ...]
    env: dict[str, str]
    port: int


def _has_flag(args: tuple[str, ...], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    """The value of `flag` in `args` (`--flag V` or `--flag=V`), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class Engine:
    name = ""
    # Metric names of the engine's queue (waiting, running) and KV-cache use.
    metric_names: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] = ((), (), ())
    # The flag that sets how many sequences the engine runs at once.
    concurrency_flag = ""
    # The flag that caps the engine's share of each GPU's memory (weights, KV cache and the
    # rest), so that engines placed side by side on one GPU stay within it.
    memory_flag = ""
    # What serves an embedding model, and the LoRA flags (vLLM's by default).
    embedding_flags: tuple[str, ...] = ("--runner", "pooling")
    lora_flag = "--enable-lora"
    max_loras_flag = "--max-loras"
    max_lora_rank_flag = "--max-lora-rank"
    # The engine's routes that load and unload an adapter at run time.
    lora_routes = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")

    def can_sleep(self, spec: ModelSpec) -> bool:
        return False

    def concurrency(self, spec: ModelSpec) -> int | None:
        """Sequences the engine runs at once, when the catalog says: its engine_args, else its
        `max_concurrency`. None: the engine's own default, which we do not guess."""
        args = list(spec.args)
        for i, arg in enumerate(args):
            value = None
            if arg == self.concurrency_flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(self.concurrency_flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                try:
                    return max(1, int(value))
                except ValueError:
                    return None
        return spec.max_concurrency

    def concurrency_args(self, spec: ModelSpec) -> list[str]:
        """The flag for the catalog's `max_concurrency`, unless engine_args set it already."""
        if spec.max_concurrency is None or any(
                a == self.concurrency_flag or a.startswith(self.concurrency_flag + "=")
                for a in spec.args):
            return []
        return [self.concurrency_flag, str(spec.max_concurrency)]

    def memory_fraction(self, spec: ModelSpec) -> float | None:
        """The share of each GPU's memory the catalog's engine_args give the engine, if any:
        the operator's figure, which placement then respects."""
        value = _flag_value(spec.args, self.memory_flag) if self.memory_flag else None
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def memory_args(self, spec: ModelSpec, fraction: float | None) -> list[str]:
        """The memory flag for the fraction placement computed, unless engine_args set it."""
        if fraction is None or not self.memory_flag or self.memory_fraction(spec) is not None:
            return []
        return [self.memory_flag, f"{fraction:.2f}"]

    def argv(self, spec: ModelSpec, host: str, port: int, *, in_container: bool) -> list[str]:
        raise NotImplementedError

    def kind_args(self, spec: ModelSpec) -> list[str]:
        """The flags that make the engine serve an embedding model (vLLM's pooling runner)."""
        if spec.kind != EMBEDDING or _has_flag(spec.args, self.embedding_flags[0]):
            return []
        return list(self.embedding_flags)

    def lora_args(self, spec: ModelSpec) -> list[str]:
        """The flags that let the engine take LoRA adapters at run time, for a base of adapters
        (unless engine_args set them: the operator's choice wins)."""
        if not spec.serves_adapters:
            return []
        args = [] if _has_flag(spec.args, self.lora_flag) or not self.lora_flag else [
            self.lora_flag]
        for flag, value in ((self.max_loras_flag, spec.max_loras),
                            (self.max_lora_rank_flag, spec.max_lora_rank)):
            if flag and not _has_flag(spec.args, flag):
                args += [flag, str(value)]
        return args

    def lora_env(self, spec: ModelSpec) -> dict[str, str]:
        return {}

    def max_loras(self, spec: ModelSpec) -> int:
        """Adapters the gateway keeps loaded per engine: the engine's flag when engine_args set
        it (the operator's figure), else the catalog's `max_loras`."""
        value = _flag_value(spec.args, self.max_loras_flag) if self.max_loras_flag else None
        try:
            return max(1, int(value)) if value is not None else spec.max_loras
        except ValueError:
            return spec.max_loras

    def launch(self, spec: ModelSpec, host: str, port: int, *, in_container: bool,
               memory_fraction: float | None = None) -> Launch:
        """What runs one instance; `memory_fraction` is its share of each GPU's memory when it
        shares GPUs with others (None: the engine's own default, a GPU to itself)."""
        argv = self.argv(spec, host, port, in_container=in_container)
        argv += self.memory_args(spec, memory_fraction) + self.kind_args(spec)
        env = dict(spec.env)
        for name, value in self.lora_env(spec).items():
            env.setdefault(name, value)
        return Launch(argv=tuple(argv + self.lora_args(spec)), env=env, port=port)

    def probe(self, endpoint: str, served_name: str, timeout: float = 2.0) -> bool:
        """True when the engine at `endpoint` is ready to serve `served_name`."""
        try:
            health = _probe_pool.request("GET", f"{endpoint}/health", timeout=timeout)
            if health.status != 200:
                return False
            models = _probe_pool.request("GET", f"{endpoint}/v1/models", timeout=timeout)
            if models.status != 200:
                return False
            listed = {m.get("id") for m in json.loads(models.data).get("data", [])}
        except (urllib3.exceptions.HTTPError, ValueError, AttributeError):
            return False
        return served_name in listed

    def load(self, endpoint: str, timeout: float = 1.0) -> EngineLoad | None:
        """Queue figures from the engine's Prometheus `/metrics`, or None if unreadable."""
        try:
            response = _probe_pool.request("GET", f"{endpoint}/metrics", timeout=timeout)
            if response.status != 200:
                return None
            families = list(text_string_to_metric_families(response.data.decode()))
        except (urllib3.exceptions.HTTPError, ValueError, UnicodeDecodeError):
            return None
        totals = [0.0, 0.0, 0.0]
        for family in families:
            for sample in family.samples:
                for index, names in enumerate(self.metric_names):
                    if sample.name in names:
                        totals[index] += sample.value
        return EngineLoad(waiting=totals[0], running=totals[1], cache_usage=totals[2])

    def sleep(self, endpoint: str, timeout: float = 120.0) -> bool:
        """Put the engine to sleep (level 1: weights to CPU memory, KV cache dropped)."""
        return self._post(f"{endpoint}/sleep?level=1", timeout)

    def wake(self, endpoint: str, timeout: float = 120.0) -> bool:
        return self._post(f"{endpoint}/wake_up", timeout)

    @staticmethod
    def _post(url: str, timeout: float) -> bool:
        try:
            return _probe_pool.request("POST", url, timeout=timeout).status == 200
        except urllib3.exceptions.HTTPError:
            return False


class VllmEngine(Engine):
    """vLLM's OpenAI server (`vllm serve`); the official image's entrypoint is the server."""

    name = "vllm"
    concurrency_flag = "--max-num-seqs"
    memory_flag = "--gpu-memory-utilization"
    metric_names = (
        ("vllm:num_requests_waiting",),
        ("vllm:num_requests_running",),
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    )

    def can_sleep(self, spec):
        # The sleep endpoints exist only when the engine was started with sleep mode.
        return "--enable-sleep-mode" in spec.args

    def argv(self, spec, host, port, *, in_container):
        args = [
            "--model", spec.repo_id,
            "--served-model-name", spec.id,
            "--host", host,
            "--port", str(port),
        ]  # fmt: skip
        if spec.revision:
            args += ["--revision", spec.revision]
        if spec.gpus > 1 and "--tensor-parallel-size" not in spec.args:
            args += ["--tensor-parallel-size", str(spec.gpus)]
        args += self.concurrency_args(spec) + list(spec.args)
        return args if in_container else ["vllm", "serve", *args]

    def launch(self, spec, host, port, *, in_container, memory_fraction=None):
        launch = super().launch(spec, host, port, in_container=in_container,
                                memory_fraction=memory_fraction)
        if "--enable-sleep-mode" in spec.args:
            # The /sleep and /wake_up endpoints exist only in vLLM's dev mode.
            launch.env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        if spec.kind != EMBEDDING:
            # GET /v1/responses/{id} and cancel answer only for stored responses.
            launch.env.setdefault("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        return launch

    def lora_env(self, spec):
        # The load and unload routes exist only with runtime updating allowed.
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if spec.serves_adapters else {}


class SglangEngine(Engine):
    name = "sglang"
    concurrency_flag = "--max-running-requests"
    # Weights and KV cache pool, as a share of the GPU's memory.
    memory_flag = "--mem-fraction-static"
    embedding_flags = ("--is-embedding",)
    lora_flag = ""  # SGLang takes adapters at run time once --max-loras-per-batch is set
    max_loras_flag = "--max-loras-per-batch"
    max_lora_rank_flag = "--max-lora-rank"
    lora_routes = ("/load_lora_adapter", "/unload_lora_adapter")
    metric_names = (
        ("sglang:num_queue_reqs",),
        ("sglang:num_running_reqs",),
        ("sglang:token_usage",),
    )

    def argv(self, spec, host, port, *, in_container):
        args = [
            "python3", "-m", "sglang.launch_server",
            "--model-path", spec.repo_id,
            "--served-model-name", spec.id,
            "--host", host,
            "--port", str(port),
        ]  # fmt: skip
        if spec.revision:
            args += ["--revision", spec.revision]
        if spec.gpus > 1 and "--tp" not in spec.args:
            args += ["--tp", str(spec.gpus)]
        return args + self.concurrency_args(spec) + list(spec.args)


class SimEngine(Engine):
    """The simulated engine in `runtimes.sim`, with vLLM's HTTP surface."""

    name = "sim"
    metric_names = VllmEngine.metric_names
    concurrency_flag = "--max-concurrency"
    # Accepted like vLLM's, so placement is exercised end to end; the sim holds no GPU memory.
    memory_flag = "--gpu-memory-utilization"

    def can_sleep(self, spec):
        return True

    def launch(self, spec, host, port, *, in_container, memory_fraction=None):
        launch = super().launch(spec, host, port, in_container=in_container,
                                memory_fraction=memory_fraction)
        if spec.kind != EMBEDDING:  # the sim reads vLLM's variable
            launch.env.setdefault("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        return launch

    def lora_env(self, spec):
        return VllmEngine.lora_env(self, spec)

    def argv(self, spec, host, port, *, in_container):
        python = "python3" if in_container else sys.executable
        return [
            python, "-m", "runtimes.sim",
            "--model", spec.id,
            "--host", host,
            "--port", str(port),
            # Like vLLM's --model: the snapshot is looked up in the HF cache ($HF_HOME).
            *(["--hf-repo", spec.repo_id] if spec.download_weights else []),
            *(["--revision", spec.revision] if spec.download_weights and spec.revision else []),
            *self.concurrency_args(spec),
            *spec.args,
        ]  # fmt: skip


ENGINES: dict[str, Engine] = {e.name: e for e in (VllmEngine(), SglangEngine(), SimEngine())}


def engine_for(spec: ModelSpec) -> Engine:
    return ENGINES[spec.engine]
