"""Real processes for the tests: a private Redis, and the orchestrator's web and control worker.

Nothing here is mocked: `RedisServer` runs redis-server on a free loopback port (a primary, or a
replica of one), `RedisSentinel` a Sentinel watching it, `Stack` runs
gunicorn (gevent) and a Celery worker with embedded beat exactly as `make run` does, and engines
are real `runtimes.sim` processes started by the control plane. Every process is started in its
own group and killed with its group at the end, engines included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import urllib3

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def kill_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def kill_engines(state_dir: Path) -> int:
    """Kill every engine a process backend started into `state_dir`; return how many."""
    killed = 0
    for state_file in Path(state_dir).glob("*.json"):
        try:
            state = json.loads(state_file.read_text())
            os.killpg(state["pid"], signal.SIGKILL)
            killed += 1
        except (OSError, ValueError, KeyError):
            state = {}
        # The engine's private TMPDIR (runtimes.backends.process), which its stop would remove.
        tmpdir = state.get("tmpdir") if isinstance(state, dict) else None
        if tmpdir and Path(tmpdir).name.startswith("llm-gw-"):
            shutil.rmtree(tmpdir, ignore_errors=True)
    return killed


def docker_answers() -> bool:
    import docker  # only the Docker tests need the SDK at hand

    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (docker.errors.DockerException, OSError):
        return False


def ensure_dockerd(log_dir: Path) -> None:
    """Make sure a Docker engine answers, starting `dockerd` when we may (root, installed).

    Raises RuntimeError saying why when none can be had. A dockerd started here is left running
    after the tests, like any system daemon.
    """
    if docker_answers():
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise RuntimeError("no Docker engine answers and dockerd cannot be started here "
                           "(needs root and dockerd installed); start it: dockerd &")
    log_path = Path(log_dir) / "dockerd.log"
    with open(log_path, "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(docker_answers, 60, interval=0.5, what="dockerd")
    except TimeoutError:
        raise RuntimeError(f"dockerd did not come up in 60 s:\n"
                           f"{log_path.read_text()[-3000:]}") from None


class RedisServer:
    """redis-server on `host` (loopback unless a test's own network gives another address)."""

    def __init__(self, workdir: Path, appendonly: bool = False, replica_of: int | None = None,
                 host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.workdir = workdir
        self.appendonly = appendonly
        self.replica_of = replica_of  # the port of the primary (on the same host) it replicates
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
        argv = [binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        if self.replica_of is not None:
            argv += ["--replicaof", self.host, str(self.replica_of)]
        if self.host != "127.0.0.1":
            # A test network's own address (tests.netns): clients come from other namespaces,
            # which protected mode (no password) would turn away.
            argv += ["--protected-mode", "no"]
        return argv

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(self._pong, 10, what="redis-server")
        return self

    def _pong(self) -> bool:
        return self.command(b"PING").startswith(b"+PONG")

    def command(self, line: bytes) -> bytes:
        """One inline command's raw reply (its first 4 kB), b"" when nothing answers."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(line + b"\r\n")
                return sock.recv(4096)
        except OSError:
            return b""

    def role(self) -> str:
        """"master" or "slave" as INFO replication says; "" when it does not answer."""
        for line in self.command(b"INFO replication").decode(errors="replace").splitlines():
            if line.startswith("role:"):
                return line.split(":", 1)[1].strip()
        return ""

    def kill(self) -> None:
        """SIGKILL: the server dies without writing anything, as on a lost machine."""
        if self.proc is not None:
            kill_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)


class RedisSentinel(RedisServer):
    """A Sentinel (`redis-server <conf> --sentinel`) watching the primary on `primary_port` as
    `master`, with the quick timeouts a test wants: the primary is "down" after `down_after_ms`
    and a failover is retried after `failover_timeout_ms`."""

    def __init__(self, workdir: Path, primary_port: int, master: str = "mymaster",
                 quorum: int = 2, down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 host: str = "127.0.0.1"):
        super().__init__(workdir, host=host)
        self.master = master
        self.config = (f"port {self.port}\nbind {host}\ndir {workdir}\nprotected-mode no\n"
                       f"sentinel monitor {master} {host} {primary_port} {quorum}\n"
                       f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
                       f"sentinel failover-timeout {master} {failover_timeout_ms}\n"
                       f"sentinel parallel-syncs {master} 1\n")

    @property
    def url(self) -> str:
        return f"sentinel://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        # Sentinel rewrites its configuration file: it must be a file of its own.
        conf = self.workdir / "sentinel.conf"
        conf.write_text(self.config)
        return [super().argv()[0], str(conf), "--sentinel"]

    def master_port(self) -> int | None:
        """The port of the master this Sentinel names now."""
        reply = self.command(f"SENTINEL get-master-addr-by-name {self.master}".encode())
        parts = reply.split(b"\r\n")
        # *2 / $9 / 127.0.0.1 / $4 / 6380
        return int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else None

    def watching(self, replicas: int = 1, other_sentinels: int = 2) -> bool:
        """The Sentinel sees the replicas and the other Sentinels, so a failover can happen."""
        reply = self.command(f"SENTINEL master {self.master}".encode())
        fields = reply.decode(errors="replace").split("\r\n")
        fields = dict(zip(fields[2::4], fields[4::4], strict=False))
        return (fields.get("num-slaves") == str(replicas)
                and fields.get("num-other-sentinels") == str(other_sentinels))


class Stack:
    """The web app and a control worker (with beat) against a given Redis and catalog."""

    def __init__(self, workdir: Path, redis_url: str, catalog: Path, keys: Path, **env):
        self.workdir = workdir
        self.port = free_port()
        self.state_dir = workdir / "runtimes"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "AUTH_KEYS_FILE": str(keys),
            "MODEL_CATALOG_FILE": str(catalog),
            "RUNTIME_TYPE": "sim",
            "RUNTIME_BACKEND": "process",
            "RUNTIME_STATE_DIR": str(self.state_dir),
            "FILES_DIR": str(workdir / "files"),
            "AUTOSCALE_INTERVAL_SECONDS": "0.5",
            "KEYS_RELOAD_INTERVAL_SECONDS": "1",
            "IDLE_TIMEOUT_SECONDS": "300",
            "WEB_BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": "2",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            # One fresh directory for the Prometheus values of all processes of this stack.
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
            **{k: str(v) for k, v in env.items()},
        }
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], netns: str | None = None,
               env: dict | None = None) -> None:
        """Start `argv` as process `name`; in the network namespace `netns` if given (as on
        another machine: `tests.netns`), with `env` over the stack's environment."""
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]  # it execs argv: the pid is argv's
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def start_web(self, name: str = "web", bind: str | None = None, netns: str | None = None,
                  env: dict | None = None) -> None:
        bind = bind or f"127.0.0.1:{self.port}"
        self._spawn(name, [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py",
                           "webapp.wsgi:app"], netns, {**(env or {}), "WEB_BIND": bind})
        wait_for(lambda: self._healthy(f"http://{bind}"), 30,
                 what=f"web on {bind}\n{self.tail(name)}")

    def start_worker(self) -> None:
        self._spawn("worker", [str(VENV_BIN / "celery"), "-A", "tasks.worker", "worker",
                               "-Q", "control,downloads", "-P", "threads", "-c", "8", "-B",
                               "--schedule", str(self.workdir / "beat-schedule"),
                               "-l", "INFO", "-n", f"control-{self.port}@%h"])
        wait_for(lambda: b"ready." in self.log_path("worker").read_bytes(), 60,
                 what=f"celery worker\n{self.tail('worker')}")

    def start_batch_worker(self, name: str = "batch", concurrency: int = 50,
                           netns: str | None = None, env: dict | None = None) -> None:
        self._spawn(name, [str(VENV_BIN / "celery"), "-A", "tasks.worker", "worker",
                           "-Q", "batch", "-P", "gevent", "-c", str(concurrency),
                           "-l", "INFO", "-n", f"{name}-{self.port}@%h"], netns, env)
        wait_for(lambda: b"ready." in self.log_path(name).read_bytes(), 60,
                 what=f"celery {name} worker\n{self.tail(name)}")

    def start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        metrics_dir = Path(self.env["PROMETHEUS_MULTIPROC_DIR"])
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        self.start_web()
        self.start_worker()
        self.start_batch_worker()
        return self

    def _healthy(self, base_url: str | None = None) -> bool:
        try:
            response = urllib3.request("GET", f"{base_url or self.base_url}/healthz", timeout=1,
                                       retries=False)
            return response.status == 200
        except urllib3.exceptions.HTTPError:
            return False

    def stop_process(self, name: str, sig=signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            kill_group(proc, sig)

    def stop(self) -> None:
        # Signal every process first, then wait: their shutdowns overlap.
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            self.stop_process(name)
        kill_engines(self.state_dir)

    def tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def engine_pids(self) -> list[int]:
        pids = []
        for state_file in self.state_dir.glob("*.json"):
            try:
                pids.append(json.loads(state_file.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                pass
        return pids
