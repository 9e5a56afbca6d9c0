"""Bringing the whole system up on 127.0.0.1 for a benchmark, and tearing all of it down again.

`Stack` starts a private redis, the gateway (gunicorn) and the control worker (celery), each as a
child in its own process group, warms models up through the gateway (which makes the control
worker start their sim engines) and finds each engine's own port in the registry. `close()` stops
gunicorn and celery by process group, then the engines by the pid in their state files, then
redis; it runs whatever happened before (exception, Ctrl-C, SIGTERM turned into an exception).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
import urllib3

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOKEN = "example-realtime-token"  # has the realtime scope in config/example.keys.json
_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>

CATALOG = {
    "models": [
        {
            "id": "bench/zero",
            "engine": "sim",
            "gpus": 0,
            "idle_timeout_seconds": 3600,
            "expected_start_seconds": 2,
            "engine_args": {"sim": ["--max-concurrency", "1024"]},
        },
        {
            "id": "bench/realistic",
            "engine": "sim",
            "gpus": 0,
            "idle_timeout_seconds": 3600,
            "engine_args": {
                "sim": ["--ttft-ms", "50", "--tpot-ms", "10", "--max-concurrency", "1024"]
            },
        },
    ]
}


class BenchError(RuntimeError):
    """The system could not be brought up, or it answered with errors: the bench is void."""


def _become_subreaper() -> None:
    """Have orphaned descendants (engines, celery's beat) re-parented to us rather than to init.

    Engines outlive celery's main process, which started them; as our orphans they are reaped by
    `_reap_orphans` at teardown instead of lingering as zombies under init. Linux only; harmless
    to skip elsewhere.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_orphans(timeout: float = 3.0) -> None:
    """Collect every child that has ended, until none is left (or `timeout` runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children at all
        if pid == 0:
            time.sleep(0.05)  # children left, none ended yet


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """Stop a child and everything in its process group: SIGTERM, then SIGKILL after `grace`."""
    # The leader first: gunicorn's master and celery's main process stop and reap their own
    # children, which leaves no orphan (or zombie) behind.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Then whatever of the group outlived it, politely and then not.
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        deadline = time.monotonic() + 2
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


class Stack:
    """The benchmarked system. Use as a context manager so teardown always runs."""

    def __init__(
        self, log_dir: Path, catalog: dict | None = None, extra_env: dict[str, str] | None = None
    ):
        self.log_dir = log_dir
        # Another bench (bench.batch) may serve other models, or set more of the environment.
        self.catalog = CATALOG if catalog is None else catalog
        self.extra_env = dict(extra_env or {})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="gw-bench-")
        self.tmp = Path(self._tmp.name)
        self.state_dir = self.tmp / "runtimes"
        self.state_dir.mkdir()
        self.redis_proc: subprocess.Popen | None = None
        self.gateway_proc: subprocess.Popen | None = None
        self.celery_proc: subprocess.Popen | None = None
        self.batch_proc: subprocess.Popen | None = None
        self.redis_port = 0
        self.gateway: Endpoint | None = None
        self.gateway_workers = 0
        self._http = urllib3.PoolManager(maxsize=4, retries=False)
        self._logs: list = []
        _become_subreaper()

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # closed in close()
        self._logs.append(log)
        # A new session makes the child lead its own process group: killpg reaches all it
        # spawns, and Ctrl-C in the terminal reaches only us, so teardown stays in our hands.
        return subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            AUTH_KEYS_FILE=str(REPO_ROOT / "config" / "example.keys.json"),
            MODEL_CATALOG_FILE=str(self.tmp / "catalog.json"),
            RUNTIME_TYPE="sim",
            RUNTIME_BACKEND="process",
            RUNTIME_STATE_DIR=str(self.state_dir),
            AUTOSCALE_INTERVAL_SECONDS="1",
            # The engines sit idle between scenarios; asleep, a direct call would be refused.
            SLEEP_AFTER_SECONDS="0",
            WEB_ACCESS_LOG="0",
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start_redis(self) -> None:
        self.redis_port = free_port()
        self.redis_proc = self._spawn(
            "redis",
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
        )  # fmt: skip
        client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            self._check_alive(self.redis_proc, "redis")
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise BenchError("redis did not answer PING within 10 s") from None
                time.sleep(0.05)
        self.redis = client
        (self.tmp / "catalog.json").write_text(json.dumps(self.catalog))

    def start_celery(self) -> None:
        # -s keeps beat's schedule file in our temp dir: the repo's own celerybeat-schedule.*
        # files are tracked by git and must not be rewritten by a benchmark.
        self.celery_proc = self._spawn(
            "celery",
            [str(VENV_BIN / "celery"), "-A", "tasks.worker", "worker", "-Q", "control,downloads",
             "-P", "threads", "-c", "4", "-B", "-l", "WARNING",
             "-s", str(self.tmp / "celerybeat-schedule")],
            env=self.env(),
        )  # fmt: skip

    def start_batch_worker(self, concurrency: int = 64, timeout: float = 60.0) -> None:
        """The batch worker as `make run` starts it: `-Q batch -P gevent -c 64`.

        Logs at INFO because that is where celery says "ready."; a chunk is one message, so the
        log stays small.
        """
        self.batch_proc = self._spawn(
            "celery-batch",
            [str(VENV_BIN / "celery"), "-A", "tasks.worker", "worker", "-Q", "batch",
             "-P", "gevent", "-c", str(concurrency), "-n", "batch-bench@%h", "-l", "INFO"],
            env=self.env(),
        )  # fmt: skip
        log_path = self.log_dir / "celery-batch.log"
        deadline = time.monotonic() + timeout
        while b"ready." not in log_path.read_bytes():
            self._check_alive(self.batch_proc, "celery-batch")
            if time.monotonic() > deadline:
                raise BenchError(f"the batch worker was not ready within {timeout:.0f} s; "
                                 f"log tail:\n{_tail(log_path)}")  # fmt: skip
            time.sleep(0.1)

    def batch_pids(self) -> list[int]:
        """The batch worker's processes (the main one and any child)."""
        if self.batch_proc is None:
            return []
        try:
            main = psutil.Process(self.batch_proc.pid)
            return [main.pid, *(c.pid for c in main.children(recursive=True))]
        except psutil.Error:
            return []

    def start_gateway(self, workers: int) -> None:
        port = free_port()
        env = self.env()
        env.update(WEB_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY=str(workers))
        self.gateway_proc = self._spawn(
            f"gunicorn-{workers}w",
            [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py", "webapp.wsgi:app"],
            env=env,
        )
        self.gateway = Endpoint("127.0.0.1", port)
        self.gateway_workers = workers
        deadline = time.monotonic() + 30
        while True:
            self._check_alive(self.gateway_proc, f"gunicorn-{workers}w")
            try:
                answer = self._http.request("GET", f"{self.gateway.base}/healthz", timeout=1.0)
                if answer.status == 200 and len(self.worker_pids()) == workers:
                    return
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    f"gunicorn with {workers} worker(s) was not healthy within 30 s; log tail:\n"
                    + _tail(self.log_dir / f"gunicorn-{workers}w.log")
                )
            time.sleep(0.1)

    def stop_gateway(self) -> None:
        if self.gateway_proc is not None:
            _stop_group(self.gateway_proc, grace=10)
            self.gateway_proc = None

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the master), oldest first."""
        if self.gateway_proc is None:
            return []
        try:
            children = psutil.Process(self.gateway_proc.pid).children()
        except psutil.Error:
            return []
        return [c.pid for c in sorted(children, key=lambda c: c.create_time())]

    def _check_alive(self, proc: subprocess.Popen | None, name: str) -> None:
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"{name} exited with code {proc.returncode}; log tail:\n"
                + _tail(self.log_dir / f"{name}.log")
            )

    def check_running(self) -> None:
        """Fail the bench if a process of the system died while it was measured."""
        self._check_alive(self.redis_proc, "redis")
        self._check_alive(self.celery_proc, "celery")
        self._check_alive(self.batch_proc, "celery-batch")
        self._check_alive(self.gateway_proc, f"gunicorn-{self.gateway_workers}w")

    # -- models ----------------------------------------------------------------------------

    def warm_up(self, model: str, timeout: float = 90.0) -> float:
        """Call `model` through the gateway until it answers 200; return the seconds it took.

        The first call answers 503 with Retry-After while the control worker starts the engine.
        """
        assert self.gateway is not None
        body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 1}).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        started = time.monotonic()
        last = ""
        while time.monotonic() - started < timeout:
            self.check_running()
            try:
                answer = self._http.request(
                    "POST",
                    f"{self.gateway.base}/v1/completions",
                    body=body,
                    headers=headers,
                    timeout=10.0,
                )
            except urllib3.exceptions.HTTPError as exc:
                last = f"connection error: {exc}"
                time.sleep(0.25)
                continue
            if answer.status == 200:
                return time.monotonic() - started
            last = f"{answer.status} {answer.data[:300]!r}"
            if answer.status != 503:
                raise BenchError(f"warming up {model}: gateway answered {last}")
            # Honour Retry-After, but look more often: the sim starts in about a second.
            retry = float(answer.headers.get("Retry-After", "1") or 1)
            time.sleep(min(retry, 0.25))
        raise BenchError(
            f"{model} was not served within {timeout:.0f} s (last answer: {last}); celery log:\n"
            + _tail(self.log_dir / "celery.log")
        )

    def engine_endpoint(self, model: str) -> Endpoint:
        """The ready engine instance of `model`, from the registry hash `gw:runtimes`."""
        for raw in self.redis.hvals("gw:runtimes"):
            record = json.loads(raw)
            if record.get("model") == model and record.get("state") == "ready":
                return Endpoint(record["host"], int(record["port"]))
        raise BenchError(f"no ready instance of {model} in gw:runtimes")

    def engine_pids(self) -> list[int]:
        """Process-group leaders of the engines, from their state files (still ours only)."""
        pids = []
        for path in self.state_dir.glob("*.json"):
            try:
                state = json.loads(path.read_text())
                pid = int(state["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                # The wrapper is gone; its group may still hold the engine. No process can
                # take a pid that is still some group's id, so the group can only be ours.
                pids.append(pid)
                continue
            # A live pid with another start time is a recycled pid: somebody else's process.
            ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
            if state.get("start_ticks") in (None, ticks):
                pids.append(pid)
        return pids

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        # Signals during teardown would leave orphans behind; hold them off until we are done.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.stop_gateway()
            if self.batch_proc is not None:
                _stop_group(self.batch_proc, grace=10)
                self.batch_proc = None
            if self.celery_proc is not None:
                _stop_group(self.celery_proc, grace=10)
                self.celery_proc = None
            self._stop_engines()
            if self.redis_proc is not None:
                _stop_group(self.redis_proc, grace=5)
                self.redis_proc = None
            _reap_orphans()
            for log in self._logs:
                log.close()
            self._logs.clear()
            self._tmp.cleanup()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_engines(self) -> None:
        pids = self.engine_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _group_alive(p)]
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """True while some process of the group is still running (zombies do not count)."""
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False
