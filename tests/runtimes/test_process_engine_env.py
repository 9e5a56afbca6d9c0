"""What an engine started by the process backend inherits, and what it does not.

The engine here is a real process run as `vllm serve ...` through PATH: a small script in a
directory given as `path_prepend`, as the vLLM venv's bin/ is given in production (VLLM_VENV),
that writes down its environment and waits. It checks the three things the CPU lane needs: the
venv first on PATH, a private TMPDIR removed at stop, and none of the orchestrator's own
Prometheus directory (with it, a real vLLM serves the gateway's metrics as its own)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelSpec
from runtimes.engines import ENGINES
from tests.harness import wait_for

FAKE_VLLM = """#!/bin/sh
ENGINE_PATH="$PATH" python3 -c 'import json, os, sys
json.dump(dict(os.environ, ARGV=" ".join(sys.argv[1:])), open(os.environ["DUMP"], "w"))' "$@"
exec sleep 30
"""


def test_engine_env_path_tmpdir_and_no_prometheus_dir(tmp_path, monkeypatch):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "vllm"
    script.write_text(FAKE_VLLM)
    script.chmod(0o755)
    dump = tmp_path / "env.json"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "gateway-metrics"))
    backend = ProcessBackend(tmp_path / "state", path_prepend=(str(bin_dir),),
                             base_env={"DUMP": str(dump)})
    spec = ModelSpec("local/tiny-llama", "vllm", args=("--enforce-eager",))
    started = backend.start("rt-env", spec, ENGINES["vllm"], gpus=())
    try:
        wait_for(dump.is_file, 10, what="the engine's environment")
        env = json.loads(wait_for(lambda: dump.read_text() or None, 5, what="the dump"))
        assert env["ENGINE_PATH"].split(os.pathsep)[0] == str(bin_dir)
        assert env["ARGV"].startswith("serve --model local/tiny-llama")
        assert "PROMETHEUS_MULTIPROC_DIR" not in env
        tmpdir = Path(env["TMPDIR"])
        assert tmpdir.is_dir() and tmpdir.name.startswith("llm-gw-")
        assert len(str(tmpdir)) < 40  # room for a Unix socket's name under 107 bytes
    finally:
        backend.stop(started.handle, grace=2)
    assert not tmpdir.exists()
    assert backend.list() == []
