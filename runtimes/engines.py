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

from runtimes.catalog import ModelSpec

_probe_pool = urllib3.PoolManager(num_pools=64, maxsize=2, retries=False)


@dataclass(frozen=True)
class Launch:
    """What a backend needs to run one engine instance."""

    argv: tuple[str, ...]
    env: dict[str, str]
    port: int


class Engine:
    name = ""
    supports_sleep = False

    def argv(self, spec: ModelSpec, host: str, port: int, *, in_container: bool) -> list[str]:
        raise NotImplementedError

    def launch(self, spec: ModelSpec, host: str, port: int, *, in_container: bool) -> Launch:
        return Launch(
            argv=tuple(self.argv(spec, host, port, in_container=in_container)),
            env=dict(spec.env),
            port=port,
        )

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


class VllmEngine(Engine):
    """vLLM's OpenAI server (`vllm serve`); the official image's entrypoint is the server."""

    name = "vllm"
    supports_sleep = True

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
        args += list(spec.args)
        return args if in_container else ["vllm", "serve", *args]

    def launch(self, spec, host, port, *, in_container):
        launch = super().launch(spec, host, port, in_container=in_container)
        if "--enable-sleep-mode" in spec.args:
            # The /sleep and /wake_up endpoints exist only in vLLM's dev mode.
            launch.env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        return launch


class SglangEngine(Engine):
    name = "sglang"

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
        return args + list(spec.args)


class SimEngine(Engine):
    """The simulated engine in `runtimes.sim`, with vLLM's HTTP surface."""

    name = "sim"
    supports_sleep = True

    def argv(self, spec, host, port, *, in_container):
        python = "python3" if in_container else sys.executable
        return [
            python, "-m", "runtimes.sim",
            "--model", spec.id,
            "--host", host,
            "--port", str(port),
            *spec.args,
        ]  # fmt: skip


ENGINES: dict[str, Engine] = {e.name: e for e in (VllmEngine(), SglangEngine(), SimEngine())}


def engine_for(spec: ModelSpec) -> Engine:
    return ENGINES[spec.engine]
