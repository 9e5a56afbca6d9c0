"""The `process` backend and the control plane on top of it, with real `runtimes.sim` engines.

Nothing is mocked: engines are real processes in their own process groups, state files live in
`tmp_path`, the registry is a real Redis (`redis_db`). An "orchestrator restart" is a separate
Python process that starts an engine and exits, leaving the engine behind, exactly as a restarted
web/control worker would find it. Every process group started here is killed at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.control import ControlPlane
from runtimes.engines import SimEngine
from runtimes.registry import READY, RuntimeRegistry
from tests.harness import REPO, wait_for

ENGINE = SimEngine()
LOAD = ("--load-seconds", "0.2")
STOP_GRACE = 5.0


# ---------------------------------------------------------------- /proc helpers


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    assert fields is not None, f"pid {pid} is gone"
    return int(fields[19])


def live_group_members(pgid: int) -> list[int]:
    """Pids of the process group that are not zombies."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def engine_pids(model: str) -> list[int]:
    """Live `python -m runtimes.sim --model <model>` processes (the engines, not the wrappers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"runtimes.sim"] and model.encode() in argv:
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def state_of(state_dir: Path, instance_id: str) -> dict:
    return json.loads((state_dir / f"{instance_id}.json").read_text())


def kill_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def groups():
    """Process groups to SIGKILL at teardown, whatever the test did."""
    pgids: list[int] = []
    yield pgids
    for pgid in pgids:
        kill_quietly(pgid)


@pytest.fixture
def state_dir(tmp_path, groups) -> Path:
    directory = tmp_path / "runtimes"
    yield directory
    for state_file in directory.glob("*.json"):
        try:
            kill_quietly(json.loads(state_file.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass


@pytest.fixture
def model() -> str:
    return f"sim/t-{uuid.uuid4().hex[:10]}"


def sim_spec(model: str, *args: str) -> ModelSpec:
    return ModelSpec(id=model, engine="sim", gpus=0, args=args or LOAD, fingerprint="fp-test")


def start(backend: ProcessBackend, groups: list[int], instance_id: str, spec: ModelSpec):
    started = backend.start(instance_id, spec, ENGINE, ())
    groups.append(state_of(backend.state_dir, instance_id)["pid"])
    return started


def wait_ready(endpoint: str, model: str) -> None:
    wait_for(lambda: ENGINE.probe(endpoint, model, timeout=0.5), 20, interval=0.05,
             what=f"{model} ready at {endpoint}")


def observed(backend: ProcessBackend, instance_id: str):
    matches = [o for o in backend.list() if o.instance_id == instance_id]
    assert len(matches) == 1, backend.list()
    return matches[0]


# ---------------------------------------------------------------- process backend


def test_start_list_probe_stop(state_dir, groups, model):
    backend = ProcessBackend(state_dir)
    started = start(backend, groups, "inst-a", sim_spec(model))
    assert started.handle == "inst-a" and started.port > 0
    pgid = state_of(state_dir, "inst-a")["pid"]

    inst = observed(backend, "inst-a")
    assert inst.running is True
    assert (inst.port, inst.model, inst.engine, inst.fingerprint) == (
        started.port, model, "sim", "fp-test",
    )
    assert inst.exit_code is None
    endpoint = f"http://{started.host}:{started.port}"
    wait_ready(endpoint, model)
    assert not ENGINE.probe(endpoint, "some/other-model")
    assert len(engine_pids(model)) == 1

    backend.stop("inst-a", grace=STOP_GRACE)
    # Stopped means no member still runs; a zombie left for init to reap does not count.
    assert live_group_members(pgid) == []
    assert not (state_dir / "inst-a.json").exists()
    assert backend.list() == []
    assert not ENGINE.probe(endpoint, model, timeout=0.5)


def test_engine_that_exits_by_itself(state_dir, groups, model):
    backend = ProcessBackend(state_dir)
    start(backend, groups, "inst-fail", sim_spec(model, "--load-seconds", "0.1", "--fail-start"))
    wait_for(lambda: not observed(backend, "inst-fail").running, 20, what="the engine to exit")
    inst = observed(backend, "inst-fail")
    assert inst.exit_code == 2
    assert "sim engine: error: simulated start failure" in backend.logs("inst-fail")

    # The exit code survives an orchestrator restart: it is kept beside the state file.
    again = observed(ProcessBackend(state_dir), "inst-fail")
    assert (again.running, again.exit_code) == (False, 2)

    backend.stop("inst-fail", grace=STOP_GRACE)
    assert sorted(p.suffix for p in state_dir.iterdir()) == [".log"]


@pytest.mark.parametrize(("victim", "exit_code"), [
    ("group", -signal.SIGKILL),  # wrapper and engine: no one is left to write an exit code
    ("engine", 128 + signal.SIGKILL),  # the engine alone (the OOM killer): the wrapper reports it
])
def test_killed_from_outside_is_listed_not_running(state_dir, groups, model, victim, exit_code):
    backend = ProcessBackend(state_dir)
    started = start(backend, groups, "inst-k", sim_spec(model))
    wait_ready(f"http://{started.host}:{started.port}", model)
    pgid = state_of(state_dir, "inst-k")["pid"]
    if victim == "group":
        os.killpg(pgid, signal.SIGKILL)
    else:
        (engine,) = engine_pids(model)
        os.kill(engine, signal.SIGKILL)

    wait_for(lambda: not observed(backend, "inst-k").running, 10, what="not running")
    assert observed(backend, "inst-k").exit_code == exit_code
    assert observed(ProcessBackend(state_dir), "inst-k").running is False


ORCHESTRATOR_START = """
import json, sys
from pathlib import Path
from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelSpec
from runtimes.engines import SimEngine
state_dir, instance_id, model = sys.argv[1:4]
spec = ModelSpec(id=model, engine="sim", gpus=0, args=tuple(sys.argv[4:]), fingerprint="fp-test")
started = ProcessBackend(Path(state_dir)).start(instance_id, spec, SimEngine(), ())
print(json.dumps({"host": started.host, "port": started.port}))
"""


def run_orchestrator(script: str, *args: str) -> dict:
    """Run `script` in a separate Python process that exits when done, like a restarted worker."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_new_backend_adopts_a_running_engine_and_stops_it(state_dir, groups, model):
    first = run_orchestrator(ORCHESTRATOR_START, str(state_dir), "inst-old", model, *LOAD)
    pgid = state_of(state_dir, "inst-old")["pid"]
    groups.append(pgid)
    endpoint = f"http://{first['host']}:{first['port']}"
    wait_ready(endpoint, model)

    backend = ProcessBackend(state_dir)  # the orchestrator after its restart
    inst = observed(backend, "inst-old")
    assert inst.running is True
    assert (inst.port, inst.model, inst.fingerprint) == (first["port"], model, "fp-test")

    backend.stop("inst-old", grace=STOP_GRACE)
    assert live_group_members(pgid) == []
    assert live_group_members(pgid) == []
    assert engine_pids(model) == []
    assert backend.list() == []


def test_recycled_pid_is_not_ours(state_dir, groups):
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    groups.append(sleeper.pid)
    state_dir.mkdir(parents=True)
    state = {
        "instance_id": "inst-stale", "model": "m", "engine": "sim", "pid": sleeper.pid,
        "start_ticks": start_ticks(sleeper.pid), "host": "127.0.0.1", "port": 1, "gpus": [],
        "fingerprint": "fp", "started_at": time.time() - 3600,
    }
    path = state_dir / "inst-stale.json"
    path.write_text(json.dumps(state))
    # Control: with its own start time, the process passes for ours.
    assert observed(ProcessBackend(state_dir), "inst-stale").running is True

    # The instance died long ago and the pid now belongs to another process.
    path.write_text(json.dumps({**state, "start_ticks": state["start_ticks"] - 1}))
    backend = ProcessBackend(state_dir)
    inst = observed(backend, "inst-stale")
    assert (inst.running, inst.exit_code) == (False, None)

    backend.stop("inst-stale", grace=1.0)
    time.sleep(0.1)
    assert sleeper.poll() is None, "stop() killed a process that is not ours"
    assert not path.exists()
    sleeper.kill()
    sleeper.wait(timeout=5)


# ---------------------------------------------------------------- control plane


def catalog_for(model: str, **entry) -> ModelCatalog:
    document = {"models": [{"id": model, "gpus": 0, "engine_args": {"sim": list(LOAD)},
                            **entry}]}
    return ModelCatalog.from_document(document, "sim")


@pytest.fixture
def make_control(redis_db, state_dir):
    planes: list[ControlPlane] = []

    def make(catalog: ModelCatalog, **options) -> ControlPlane:
        options.setdefault("stop_grace", STOP_GRACE)
        plane = ControlPlane(catalog, RuntimeRegistry(redis_db), ProcessBackend(state_dir),
                             **options)
        planes.append(plane)
        return plane

    yield make
    for plane in reversed(planes):
        plane.stop_all("test teardown")


def engine_groups(state_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in state_dir.glob("*.json")]


def test_ensure_running_starts_one_instance_once(make_control, state_dir, groups, model):
    control = make_control(catalog_for(model))
    registry = control.registry
    started_at = time.time()
    record = control.ensure_running(model)
    groups.extend(engine_groups(state_dir))
    assert record is not None and record.state == READY
    assert record.port > 0 and record.ready_at is not None
    assert registry.get(record.id) == record
    durations = registry.start_durations(model)
    assert len(durations) == 1
    assert 0.2 <= durations[0] <= time.time() - started_at + 0.01
    assert registry.median_start_seconds(model) == durations[0]
    assert ENGINE.probe(record.endpoint, model)
    assert [o.instance_id for o in control.backend.list()] == [record.id]

    assert control.ensure_running(model) is None  # a live instance: nothing to do
    assert [r.id for r in registry.for_model(model)] == [record.id]
    assert [o.instance_id for o in control.backend.list()] == [record.id]
    assert len(engine_pids(model)) == 1
    assert len(registry.start_durations(model)) == 1


def test_concurrent_ensure_running_starts_exactly_one(make_control, state_dir, groups, model):
    control = make_control(catalog_for(model))
    callers = 5
    barrier = threading.Barrier(callers)
    results: list = [None] * callers
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = control.ensure_running(model)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    groups.extend(engine_groups(state_dir))
    assert errors == []
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert winners[0].state == READY
    assert [r.id for r in control.registry.for_model(model)] == [winners[0].id]
    assert len(list(state_dir.glob("*.json"))) == 1
    assert len(engine_pids(model)) == 1


ORCHESTRATOR_ENSURE = """
import json, sys
from pathlib import Path
import redis
from runtimes.backends.process import ProcessBackend
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.registry import RuntimeRegistry
url, state_dir, document, model = sys.argv[1:5]
control = ControlPlane(ModelCatalog.from_document(json.loads(document), "sim"),
                       RuntimeRegistry(redis.Redis.from_url(url)), ProcessBackend(Path(state_dir)))
record = control.ensure_running(model)
print(json.dumps({"id": record.id, "state": record.state, "port": record.port}))
"""


def test_tick_adopts_a_running_engine_after_a_redis_flush(
    make_control, redis_server, redis_db, state_dir, groups, model
):
    entry = {"id": model, "gpus": 0, "engine_args": {"sim": list(LOAD)}}
    first = run_orchestrator(ORCHESTRATOR_ENSURE, f"{redis_server.url}/1", str(state_dir),
                             json.dumps({"models": [entry]}), model)
    groups.extend(engine_groups(state_dir))
    assert first["state"] == READY
    (engine_pid,) = engine_pids(model)

    redis_db.flushdb()  # the registry is lost; the engine keeps running
    control = make_control(catalog_for(model))
    assert control.registry.all() == []

    decisions = control.tick()
    assert decisions is not None
    assert [(d["action"], d["instance"]) for d in decisions] == [("adopt", first["id"])]
    record = control.registry.get(first["id"])
    assert record is not None
    assert (record.state, record.port, record.reason) == (READY, first["port"],
                                                           "readiness probe passed")
    assert control.registry.start_durations(model) == []  # an adopted load time is unknown
    assert engine_pids(model) == [engine_pid]  # no second engine
    assert len(list(state_dir.glob("*.json"))) == 1
    assert [d["action"] for d in control.registry.recent_decisions()] == ["adopt"]

    assert control.tick() == []  # settled: a ready, recently adopted instance
    assert engine_pids(model) == [engine_pid]

    pgids = engine_groups(state_dir)
    assert control.stop_all() == 1
    assert control.registry.all() == []
    assert list(state_dir.glob("*.json")) == []
    assert engine_pids(model) == []
    assert all(live_group_members(pgid) == [] for pgid in pgids)


def test_min_replicas_two_gets_two_instances_and_stop_all_stops_both(
    make_control, state_dir, groups, model
):
    control = make_control(catalog_for(model, min_replicas=2, max_replicas=2))
    first = control.tick()
    groups.extend(engine_groups(state_dir))
    assert [(d["action"], d["reason"]) for d in first] == [("start", "below min_replicas=2")]
    assert len(control.registry.for_model(model)) >= 1

    control.tick()
    groups.extend(engine_groups(state_dir))
    live = [r for r in control.registry.for_model(model) if r.state == READY]
    assert len(live) == 2, (
        "plan() asked for a start 'below min_replicas=2' but the control plane did not carry it "
        f"out; instances: {live}"
    )
    assert len(engine_pids(model)) == 2
    assert control.tick() == []  # min_replicas met: nothing more to do

    pgids = engine_groups(state_dir)
    assert len(pgids) == 2
    assert control.stop_all() == 2
    assert control.registry.all() == []
    assert control.backend.list() == []
    assert engine_pids(model) == []
    assert all(live_group_members(pgid) == [] for pgid in pgids)
