"""`make run`'s stack script, end to end: it starts everything on loopback, serves the README
demo, keeps the periodic tasks' chatter out of its INFO log, and stops every process it started
(engines and the Redis it started included) once and completely, however many signals come
during the stop, with the process backend and with the docker backend."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import urllib3

from tests.harness import REPO, free_port, kill_engines, wait_for

DEMO_MODEL = "synquid/gemma-3-27b-it-FP8"
DEMO = {"model": DEMO_MODEL, "prompt": "hello", "max_tokens": 16}
# Kept out of the environment of the script and of the CLI: config/checkout.env's variables,
# which each must find itself as on a fresh checkout, and the binds, whose defaults are tested.
CHECKOUT_VARIABLES = ("RUNTIME_TYPE", "RUNTIME_BACKEND", "AUTH_KEYS_FILE", "ENV_FILE",
                      "WEB_BIND", "FLOWER_BIND", "FLOWER_BASIC_AUTH")
# No keep-alive: gunicorn's graceful stop waits for open connections (up to the script's 10 s).
CLOSE = {"Connection": "close"}
# Celery's routine lines about the periodic tasks (worker: received, succeeded; beat: sending).
PERIODIC_CHATTER = re.compile(r"Task (autoscale\.tick|batch\.sweep)\[|Sending due task")


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}
    return {
        **env,
        "ENV_FILE": str(tmp_path / "no.env"),  # as on a fresh checkout: no .env
        "VAR_DIR": str(tmp_path / "var"),
        "RUNTIME_STATE_DIR": str(tmp_path / "runtimes"),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "WEB_PORT": str(free_port()),
        "FLOWER_PORT": str(free_port()),
        "AUTOSCALE_INTERVAL_SECONDS": "1",
        **extra,
    }


def _post(port: int):
    return urllib3.request(
        "POST", f"http://127.0.0.1:{port}/v1/completions", body=json.dumps(DEMO).encode(),
        headers={"Authorization": "Bearer example-realtime-token",
                 "Content-Type": "application/json", **CLOSE},
        retries=False, timeout=10,
    )


def _answers(url: str) -> bool:
    try:
        return urllib3.request("GET", url, headers=CLOSE, retries=False, timeout=1).status == 200
    except urllib3.exceptions.HTTPError:
        return False


def _redis_answers(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RunStack:
    """scripts/run-stack.sh as `make run` runs it, in a session of its own (as a terminal's
    foreground job), its output in run.log."""

    def __init__(self, tmp_path: Path, env: dict):
        self.env = env
        self.web = int(env["WEB_PORT"])
        self.flower = int(env["FLOWER_PORT"])
        self.log_path = tmp_path / "run.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["scripts/run-stack.sh"], cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self) -> None:
        try:
            wait_for(lambda: self.proc.poll() is not None
                     or _answers(f"http://127.0.0.1:{self.web}/healthz"),
                     90, interval=0.2, what="the stack to serve")
        finally:
            assert self.proc.poll() is None, f"run-stack.sh exited:\n{self.output[-4000:]}"

    def serve_the_demo(self) -> None:
        first = _post(self.web)
        assert first.status == 503 and int(first.headers["Retry-After"]) >= 1
        wait_for(lambda: _post(self.web).status == 200, 60, interval=0.5,
                 what="the demo to answer")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop_with_signals(self, keep_signalling: bool = False) -> int:
        """Ctrl-C, then 0.3 s later (the clean-up under way) a `kill` of the whole process group;
        with `keep_signalling`, one more every 0.3 s until the script exits, so that signals also
        land while the engines and Redis are being stopped. Returns the exit status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while keep_signalling and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        """After a failed test: kill whatever is left, children (each in a session of its own),
        engines and the Redis the script started included."""
        groups = {self.proc.pid}
        with contextlib.suppress(psutil.Error):
            for child in self.children():
                with contextlib.suppress(OSError):
                    groups.add(os.getpgid(child.pid))
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        kill_engines(Path(self.env["RUNTIME_STATE_DIR"]))
        if _redis_answers(self.env["REDIS_URL"]):  # so its pid file is not a stale one
            with contextlib.suppress(OSError, ValueError):
                redis_pid = Path(self.env["VAR_DIR"], "redis", "redis.pid").read_text()
                os.kill(int(redis_pid), signal.SIGKILL)
        self._log.close()


def _assert_stopped_once(stack: RunStack, status: int, children: list[psutil.Process]) -> None:
    assert status == 130, stack.output[-4000:]  # the first signal's status: Ctrl-C
    wait_for(lambda: not [c for c in children if c.is_running() and c.status() != "zombie"], 10,
             interval=0.1, what="every child of the stack to exit")
    assert not _redis_answers(stack.env["REDIS_URL"])
    output = stack.output
    for step in ("stopping the stack", "stopped 1 runtime(s)", "redis: stopped"):
        assert output.count(step) == 1, (step, output[-4000:])
    # The second signal came during the clean-up, and did not cut it short.
    assert "signal(s) during the stop were ignored" in output
    assert output.index("stopping the stack") < output.index("stopped 1 runtime(s)") \
        < output.index("redis: stopped")


def _listening_addresses(processes: list[psutil.Process]) -> set[str]:
    return {c.laddr.ip for p in processes for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def _status_by_hand(env: dict) -> dict:
    """`python -m runtimes status` as typed in the checkout: no variable `make run` sets, but the
    Redis and the state directory of this test's stack."""
    cli_env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}
    cli_env.update({k: env[k] for k in ("ENV_FILE", "REDIS_URL", "RUNTIME_STATE_DIR")})
    status = subprocess.run([sys.executable, "-m", "runtimes", "status"], cwd=REPO, env=cli_env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)


def test_run_stack_serves_the_readme_demo_on_loopback_and_stops_everything(tmp_path):
    stack = RunStack(tmp_path, _env(
        tmp_path,
        # A tick a second, the batch sweep too, and an engine put to sleep 2 s after its last
        # call: periodic chatter, and one autoscaler decision that changes something.
        BATCH_SWEEP_SECONDS="1", SLEEP_AFTER_SECONDS="2",
    ))
    try:
        stack.wait_serving()
        assert "example tokens" in stack.output and "redis: started" in stack.output
        stack.serve_the_demo()
        wait_for(lambda: _answers(f"http://127.0.0.1:{stack.flower}/"), 30, what="flower")

        children = stack.children()
        names = {os.path.basename(arg) for c in children for arg in c.cmdline()[:2]}
        assert {"gunicorn", "celery"} <= names
        # Web and Flower listen on loopback only.
        served = [c for c in children if c.name() in ("gunicorn", "celery")]
        listening = _listening_addresses(served)
        assert {ipaddress.ip_address(ip).is_loopback for ip in listening} == {True}, listening
        assert {str(stack.web), str(stack.flower)} <= {
            str(c.laddr.port) for p in served for c in p.net_connections(kind="inet")}
        other = _other_address()
        if other is not None:
            for port in (stack.web, stack.flower):
                with pytest.raises(OSError), socket.create_connection((other, port), timeout=1):
                    pass

        # The CLI, typed by hand in the checkout, sees the engine `make run` started.
        cli = _status_by_hand(stack.env)
        assert [r["model"] for r in cli["runtimes"]] == [DEMO_MODEL]
        assert cli["failed_starts"] == {}

        engines = [json.loads(p.read_text())["pid"]
                   for p in (tmp_path / "runtimes").glob("*.json")]
        assert len(engines) == 1
        # The autoscaler's decision is at INFO; its ticks and the sweeps are not, other tasks are.
        decision = re.compile(rf"INFO runtimes\.control\[.*: sleep {re.escape(DEMO_MODEL)} rt-")
        wait_for(lambda: decision.search(stack.output), 20, interval=0.2,
                 what="the autoscaler to put the idle engine to sleep")
        output = stack.output
        assert "Task control.ensure_running[" in output and f"ready for {DEMO_MODEL}" in output
        assert not PERIODIC_CHATTER.findall(output)
        engine_log = (tmp_path / "runtimes" / f"{cli['runtimes'][0]['id']}.log").read_text()
        assert "sim engine ready" in engine_log and "/v1/completions" not in engine_log

        status = stack.stop_with_signals()
        _assert_stopped_once(stack, status, children)
        for pid in engines:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert not list((tmp_path / "runtimes").glob("*.json"))
    finally:
        stack.close()


def test_run_stack_refuses_to_expose_flower_without_a_password(tmp_path):
    env = _env(tmp_path, FLOWER_BIND="0.0.0.0")
    run = subprocess.run(["scripts/run-stack.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2
    assert "FLOWER_BASIC_AUTH" in run.stderr and "FLOWER_BIND=0.0.0.0" in run.stderr
    # Refused before anything started: no Redis, no child.
    assert "redis:" not in run.stdout + run.stderr
    assert not (tmp_path / "var").exists() and not _redis_answers(env["REDIS_URL"])


@pytest.mark.docker
def test_run_stack_with_the_docker_backend_stops_its_containers(tmp_path, docker_daemon):
    orchestrator_id = f"make-run-{uuid.uuid4().hex[:8]}"
    label = f"label=llm-gateway.orchestrator={orchestrator_id}"

    def containers() -> list[str]:
        return subprocess.run(["docker", "ps", "-a", "-q", "--filter", label],
                              capture_output=True, text=True, check=True).stdout.split()

    (tmp_path / "hf").mkdir()
    stack = RunStack(tmp_path, _env(
        tmp_path, RUNTIME_BACKEND="docker", RUNTIME_IMAGE=docker_daemon,
        ORCHESTRATOR_ID=orchestrator_id, HF_HOME=str(tmp_path / "hf"),
    ))
    try:
        stack.wait_serving()
        stack.serve_the_demo()
        assert len(containers()) == 1
        assert not PERIODIC_CHATTER.findall(stack.output)
        children = stack.children()

        status = stack.stop_with_signals(keep_signalling=True)
        _assert_stopped_once(stack, status, children)
        assert containers() == []
    finally:
        stack.close()
        for container in containers():
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)

