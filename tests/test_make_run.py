"""`make run`'s stack script, end to end: it starts everything, serves the README demo, and
stops every process it started (engines and the Redis it started included) on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import urllib3

from tests.harness import REPO, free_port, wait_for

DEMO = {"model": "synquid/gemma-3-27b-it-FP8", "prompt": "hello", "max_tokens": 16}


def _post(port: int):
    return urllib3.request(
        "POST", f"http://127.0.0.1:{port}/v1/completions", body=json.dumps(DEMO).encode(),
        headers={"Authorization": "Bearer example-realtime-token",
                 "Content-Type": "application/json"},
        retries=False, timeout=10,
    )


def test_run_stack_serves_the_readme_demo_and_stops_everything(tmp_path):
    web, flower, redis_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "ENV_FILE": str(tmp_path / "no.env"),  # as on a fresh checkout: no .env
        "VAR_DIR": str(tmp_path / "var"),
        "RUNTIME_STATE_DIR": str(tmp_path / "runtimes"),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "WEB_PORT": str(web),
        "FLOWER_PORT": str(flower),
        "AUTOSCALE_INTERVAL_SECONDS": "1",
    }
    log = open(tmp_path / "run.log", "wb")
    script = subprocess.Popen(["scripts/run-stack.sh"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def serving():
            try:
                return urllib3.request("GET", f"http://127.0.0.1:{web}/healthz",
                                       retries=False, timeout=1).status == 200
            except urllib3.exceptions.HTTPError:
                return False

        wait_for(serving, 60, interval=0.2, what="the stack to serve")
        output = (tmp_path / "run.log").read_text()
        assert "example tokens" in output and "redis: started" in output

        first = _post(web)
        assert first.status == 503 and int(first.headers["Retry-After"]) >= 1
        wait_for(lambda: _post(web).status == 200, 30, interval=0.5, what="the demo to answer")
        wait_for(lambda: urllib3.request("GET", f"http://127.0.0.1:{flower}/", retries=False,
                                         timeout=1).status == 200, 30, what="flower")

        children = psutil.Process(script.pid).children(recursive=True)
        engines = [json.loads(p.read_text())["pid"]
                   for p in (tmp_path / "runtimes").glob("*.json")]
        assert len(engines) == 1
        assert {"gunicorn", "celery"} <= {
            os.path.basename(arg) for c in children for arg in c.cmdline()[:2]
        }

        os.killpg(script.pid, signal.SIGTERM)
        script.wait(timeout=60)
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != "zombie"]
        for pid in engines:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert not list((tmp_path / "runtimes").glob("*.json"))
        output = (tmp_path / "run.log").read_text()
        assert "stopped 1 runtime(s)" in output and "redis: stopped" in output
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        log.close()
