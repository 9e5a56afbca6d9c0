"""The `process` backend: each engine instance is a local process group.

Every instance has a state file `<state_dir>/<instance_id>.json` (pid, port, model, the kernel's
start time of the process, so a recycled pid is never mistaken for ours) and a log file. The
engine runs under a small `sh` wrapper in its own session that writes the engine's exit code to
`<instance_id>.exit` when it ends by itself, so a crash is seen with its code even by an
orchestrator that was restarted in between. Stop sends SIGTERM to the group, then SIGKILL.

Each engine also gets a private TMPDIR, removed when it is stopped: vLLM leaves its IPC sockets
there, and would otherwise leave them behind in /tmp at every start. It is a short path of its own
(`/tmp/llm-gw-XXXX`), not one under the state directory, since a Unix socket's path may not be
longer than 107 bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from runtimes.backends.base import Backend, BackendError, Observed, Started
from runtimes.catalog import ModelSpec
from runtimes.engines import Engine
from runtimes.storage import snapshot_complete

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# "$@" is the engine's argv; its exit code is kept when it ends by itself.
_WRAPPER = '"$@"; echo $? > "$GW_EXIT_FILE"'


# The orchestrator's own variables that an engine must not inherit. vLLM's server uses
# prometheus_client too: given the orchestrator's multiprocess directory it would serve the
# gateway's metrics as its own /metrics (hiding vllm:num_requests_waiting from the autoscaler)
# and write its values among the gateway's.
_ORCHESTRATOR_ONLY = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; the fields after it start past the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", base_env: dict | None = None,
                 path_prepend: tuple[str, ...] = ()):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.base_env = base_env or {}
        # Directories put first on the engines' PATH (the vLLM venv's bin/, runtimes.factory).
        self.path_prepend = tuple(path_prepend)
        self._children: dict[str, subprocess.Popen] = {}

    def _paths(self, instance_id: str) -> tuple[Path, Path, Path]:
        base = self.state_dir / instance_id
        return base.with_suffix(".json"), base.with_suffix(".log"), base.with_suffix(".exit")

    def start(self, instance_id, spec: ModelSpec, engine: Engine, gpus, gpu_host="local",
              memory_fraction=None):
        state_path, log_path, exit_path = self._paths(instance_id)
        port = free_port(self.host)
        launch = engine.launch(spec, self.host, port, in_container=False,
                               memory_fraction=memory_fraction)
        env = {**os.environ, **self.base_env, **launch.env, "GW_EXIT_FILE": str(exit_path)}
        for name in _ORCHESTRATOR_ONLY:
            if name not in launch.env:
                env.pop(name, None)
        hf_home = self.base_env.get("HF_HOME")
        if hf_home and "HF_HUB_OFFLINE" not in launch.env and snapshot_complete(
                Path(hf_home), spec.repo_id, spec.revision):
            # As the docker backend does: the engine loads from the cache, asking the Hub nothing.
            env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if self.path_prepend:
            env["PATH"] = os.pathsep.join([*self.path_prepend, env.get("PATH", os.defpath)])
        tmpdir = tempfile.mkdtemp(prefix="llm-gw-")
        env["TMPDIR"] = tmpdir
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        exit_path.unlink(missing_ok=True)
        with open(log_path, "ab") as log_file:
            try:
                child = subprocess.Popen(
                    ["/bin/sh", "-c", _WRAPPER, "engine", *launch.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_ROOT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise BackendError(f"cannot run {launch.argv[0]}: {exc.strerror}") from None
        self._children[instance_id] = child
        state = {
            "instance_id": instance_id,
            "model": spec.id,
            "engine": engine.name,
            "pid": child.pid,
            "start_ticks": _process_start_ticks(child.pid),
            "host": self.host,
            "port": port,
            "gpus": list(gpus),
            "fingerprint": spec.fingerprint,
            "started_at": time.time(),
            "tmpdir": tmpdir,
        }
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(state_path)
        log.info("started %s for %s as pid %d on port %d", instance_id, spec.id, child.pid, port)
        return Started(handle=instance_id, host=self.host, port=port)

    def _read_state(self, instance_id: str) -> dict | None:
        try:
            return json.loads(self._paths(instance_id)[0].read_text())
        except (OSError, ValueError):
            return None

    def _alive(self, state: dict) -> bool:
        child = self._children.get(state["instance_id"])
        if child is not None and child.poll() is not None:
            return False
        ticks = _process_start_ticks(state["pid"])
        return ticks is not None and ticks == state.get("start_ticks")

    def _exit_code(self, instance_id: str) -> int | None:
        try:
            return int(self._paths(instance_id)[2].read_text().strip())
        except (OSError, ValueError):
            child = self._children.get(instance_id)
            return child.returncode if child is not None else None

    def list(self) -> list[Observed]:
        observed = []
        for state_path in sorted(self.state_dir.glob("*.json")):
            state = self._read_state(state_path.stem)
            if state is None:
                continue
            running = self._alive(state)
            observed.append(
                Observed(
                    instance_id=state["instance_id"],
                    model=state["model"],
                    engine=state["engine"],
                    handle=state["instance_id"],
                    host=state["host"],
                    port=state["port"],
                    running=running,
                    exit_code=None if running else self._exit_code(state["instance_id"]),
                    fingerprint=state.get("fingerprint", ""),
                    gpus=tuple(state.get("gpus", ())),
                    started_at=state.get("started_at", 0.0),
                )
            )
        return observed

    def stop(self, handle: str, grace: float = 10.0) -> None:
        state = self._read_state(handle)
        if state is not None and self._alive(state):
            # start_new_session made the wrapper the leader of its own group; once seen alive,
            # its group id stays ours for as long as any member lives.
            pgid = state["pid"]
            self._signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._group_alive(handle, pgid):
                time.sleep(0.05)
            if self._group_alive(handle, pgid):
                log.warning("%s did not stop within %.0f s; killing it", handle, grace)
                self._signal_group(pgid, signal.SIGKILL)
        child = self._children.pop(handle, None)
        if child is not None:
            child.wait(timeout=5)
        tmpdir = (state or {}).get("tmpdir")
        if tmpdir and Path(tmpdir).name.startswith("llm-gw-"):
            shutil.rmtree(tmpdir, ignore_errors=True)
        state_path, _, exit_path = self._paths(handle)
        state_path.unlink(missing_ok=True)
        exit_path.unlink(missing_ok=True)

    def _group_alive(self, instance_id: str, pgid: int) -> bool:
        """True while a member of the group still runs (zombies do not count: whoever reaps
        them, init or nobody in a container without one, may take its time)."""
        child = self._children.get(instance_id)
        if child is not None:
            child.poll()
        for stat_path in Path("/proc").glob("[0-9]*/stat"):
            try:
                stat = stat_path.read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The pid was recycled by another user's process: not ours to signal.
            log.warning("not signalling process group %d: not ours", pgid)

    def logs(self, handle: str, tail: int = 50) -> str:
        log_path = self._paths(handle)[1]
        try:
            with open(log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])
