"""The control plane on its own: a fake backend (processes that exist only as records), fake
engines and a fake clock, with a real Redis behind the registry. Start, ready, three failed
starts, sleep and wake, drain and stop on idle, adoption, and the state table."""

from __future__ import annotations

import pytest
import redis as redis_lib

from runtimes.backends.base import Backend, Observed, Started
from runtimes.catalog import ModelCatalog
from runtimes.control import ControlPlane
from runtimes.policy import MAX_FAILED_STARTS
from runtimes.registry import READY, SLEEPING, RuntimeRegistry
from tests.harness import RedisServer


class Clock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.now += seconds


class FakeEngine:
    """Ready after `load_probes` probes; or its process dies while loading (`dies`)."""

    def __init__(self, backend: FakeBackend, load_probes: int = 3, dies: bool = False):
        self.backend, self.load_probes, self.dies = backend, load_probes, dies
        self.probes: dict[str, int] = {}
        self.asleep: set[str] = set()

    def probe(self, endpoint, served_name, timeout=2.0):
        self.probes[endpoint] = self.probes.get(endpoint, 0) + 1
        if self.dies:
            self.backend.exit(endpoint, 3)
            return False
        return self.probes[endpoint] >= self.load_probes

    def can_sleep(self, spec):
        return True

    def load(self, endpoint, timeout=1.0):
        return None

    def sleep(self, endpoint, timeout=120.0):
        self.asleep.add(endpoint)
        return True

    def wake(self, endpoint, timeout=120.0):
        self.asleep.discard(endpoint)
        return True


class FakeBackend(Backend):
    name = "fake"

    def __init__(self):
        self.running: dict[str, Observed] = {}
        self.stopped: list[str] = []
        self.port = 9000

    def start(self, instance_id, spec, engine, gpus, gpu_host="local"):
        self.port += 1
        self.running[instance_id] = Observed(instance_id, spec.id, spec.engine, instance_id,
                                             "127.0.0.1", self.port, True)
        return Started(instance_id, "127.0.0.1", self.port)

    def exit(self, endpoint: str, code: int) -> None:
        for handle, inst in self.running.items():
            if endpoint.endswith(f":{inst.port}"):
                self.running[handle] = Observed(inst.instance_id, inst.model, inst.engine,
                                                handle, inst.host, inst.port, False, code)

    def stop(self, handle, grace=10.0):
        self.stopped.append(handle)
        self.running.pop(handle, None)

    def list(self):
        return list(self.running.values())

    def logs(self, handle, tail=50):
        return "fake engine log line"


@pytest.fixture
def plane(redis_db):
    clock = Clock(1_000_000_000.0)
    backend = FakeBackend()
    engine = FakeEngine(backend)
    catalog = ModelCatalog.from_document({"models": [
        {"id": "m/a", "gpus": 0, "idle_timeout_seconds": 300},
    ]}, "sim")
    started: list[tuple] = []
    control = ControlPlane(
        catalog, RuntimeRegistry(redis_db, "t"), backend, clock=clock, pause=clock.pause,
        engines=lambda spec: engine, restart_backoff_base=0, min_lifetime=0,
        sleep_after_seconds=60, on_started=lambda *event: started.append(event),
    )
    return control, backend, engine, clock, started


def test_a_start_is_ready_once_the_engine_answers(plane):
    control, backend, engine, clock, started = plane
    before = clock.now
    record = control.ensure_running("m/a")
    assert record.state == READY and record.id in backend.running
    assert engine.probes[record.endpoint] == 3
    assert started == [("m/a", "cold", clock.now - before)]
    assert control.registry.median_start_seconds("m/a") == pytest.approx(clock.now - before)
    assert control.ensure_running("m/a") is None  # one live instance is enough
    assert len(backend.running) == 1


def test_three_failed_starts_mark_the_model_failed_until_reset(plane):
    control, backend, engine, _, _ = plane
    engine.dies = True
    for attempt in range(1, MAX_FAILED_STARTS + 1):
        assert control.ensure_running("m/a") is None
        assert control.registry.failed_starts()["m/a"] == attempt
    failure = control.registry.last_failure("m/a")
    assert failure["exit_code"] == 3 and failure["last_logs"] == "fake engine log line"
    starts = len(backend.running)
    assert control.ensure_running("m/a") is None  # refused: no fourth start
    assert len(backend.running) == starts
    control.registry.reset_model("m/a")
    engine.dies = False
    assert control.ensure_running("m/a").state == READY


def test_sleep_and_wake_keep_the_same_engine(plane):
    control, backend, engine, clock, started = plane
    record = control.ensure_running("m/a")
    assert control.sleep(record.id, "idle").state == SLEEPING
    assert record.endpoint in engine.asleep
    clock.pause(5)
    woken = control.ensure_running("m/a")  # a call wants it: woken, not started again
    assert woken.id == record.id and woken.state == READY
    assert record.endpoint not in engine.asleep and len(backend.running) == 1
    assert started[-1][:2] == ("m/a", "wake")


def test_the_tick_sleeps_then_stops_an_idle_engine(plane):
    control, backend, _, clock, _ = plane
    record = control.ensure_running("m/a")
    clock.pause(90)  # past sleep_after (60 s), within the idle timeout (300 s)
    decisions = control.tick()
    assert [d["action"] for d in decisions] == ["sleep"]
    assert control.registry.get(record.id).state == SLEEPING
    clock.pause(400)  # past the idle timeout
    decisions = control.tick()
    assert "stop" in [d["action"] for d in decisions]
    assert control.registry.get(record.id) is None and backend.stopped == [record.id]


def test_a_call_in_flight_keeps_an_engine_past_its_idle_timeout(plane):
    control, backend, _, clock, _ = plane
    control.sleep_after_seconds = None
    record = control.ensure_running("m/a")
    control.registry.report_usage("web-1", {record.id: clock.now}, {record.id: 1}, {})
    clock.pause(400)
    assert [d["action"] for d in control.tick()] == []  # busy, however long ago it began
    control.registry.report_usage("web-1", {record.id: clock.now - 350}, {record.id: 0}, {})
    actions = [d["action"] for _ in range(3) for d in control.tick()]
    assert actions == ["drain", "stop"], actions  # idle now: drained, then stopped
    assert backend.stopped == [record.id]


def test_an_engine_with_a_call_in_flight_is_drained_before_it_is_evicted(redis_db):
    clock, backend = Clock(1_000_000_000.0), FakeBackend()
    engine = FakeEngine(backend)
    catalog = ModelCatalog.from_document({"models": [
        {"id": "m/a", "gpus": 1}, {"id": "m/b", "gpus": 1}]}, "sim")
    control = ControlPlane(catalog, RuntimeRegistry(redis_db, "t"), backend, clock=clock,
                           pause=clock.pause, engines=lambda spec: engine, min_lifetime=0,
                           restart_backoff_base=0, gpu_inventory={"local": (0,)})
    a = control.ensure_running("m/a")
    control.registry.report_usage("web-1", {a.id: clock.now}, {a.id: 1}, {})
    control.registry.note_demand("m/b")  # a caller waits for b: the one GPU is a's
    clock.pause(120)
    decisions = control.tick()
    assert [(d["action"], d["model"]) for d in decisions][:1] == [("drain", "m/a")], decisions
    assert control.registry.get(a.id).state == "draining" and not backend.stopped
    control.registry.report_usage("web-1", {a.id: clock.now}, {a.id: 0}, {})  # the call ended
    clock.pause(1)
    control.tick()
    assert backend.stopped == [a.id]
    control.tick()  # the freed GPU goes to b
    assert [r.model for r in control.registry.all() if r.state == READY] == ["m/b"]


def test_an_engine_running_without_a_record_is_adopted_not_duplicated(plane):
    control, backend, engine, _, _ = plane
    backend.running["left-over"] = Observed("rt-old", "m/a", "sim", "left-over", "127.0.0.1",
                                            9500, True, fingerprint=control.catalog.get("m/a")
                                            .fingerprint)
    decisions = control.tick()
    assert [d["action"] for d in decisions][:1] == ["adopt"]
    adopted = control.registry.get("rt-old")
    assert adopted is not None and adopted.port == 9500
    engine.probes.clear()
    engine.load_probes = 1
    control.tick()  # the tick probes what it adopted
    assert control.registry.get("rt-old").state == READY
    assert control.ensure_running("m/a") is None and len(backend.running) == 1


def test_the_registry_refuses_moves_outside_its_table(plane):
    control, _, _, _, _ = plane
    record = control.ensure_running("m/a")
    registry = control.registry
    assert registry.transition(record.id, None, state="draining") is not None
    assert registry.transition(record.id, None, state="ready") is None  # no way back
    assert registry.get(record.id).state == "draining"
    assert registry.transition(record.id, None, state="stopping").state == "stopping"
    assert registry.transition(record.id, None, state="sleeping") is None


class RedisGoesAwayBackend(FakeBackend):
    """A backend whose next list() (inside a tick) finds Redis stopping under it."""

    def __init__(self, server):
        super().__init__()
        self.server, self.stop_redis = server, False

    def list(self):
        if self.stop_redis:
            self.stop_redis = False
            self.server.stop()  # SIGTERM: the AOF keeps the tick's lock, as a replica would
        return super().list()


def test_a_tick_lock_left_by_redis_going_away_is_given_back_by_the_next_tick(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        client = redis_lib.Redis.from_url(f"{server.url}/0", socket_connect_timeout=1)
        backend = RedisGoesAwayBackend(server)
        catalog = ModelCatalog.from_document({"models": [{"id": "m/a", "gpus": 0}]}, "sim")
        clock = Clock(1_000_000_000.0)
        control = ControlPlane(catalog, RuntimeRegistry(client, "t"), backend, clock=clock,
                               pause=clock.pause, engines=lambda spec: FakeEngine(backend))
        assert control.tick() == []
        backend.stop_redis = True
        with pytest.raises(redis_lib.ConnectionError):
            control.tick()
        server.start()  # same port, same AOF: the lock key is back, with its 60 s to run
        assert client.exists("t:lock:tick")
        assert control.tick() == []  # not None: the lock was given back and taken again
        assert not client.exists("t:lock:tick")
    finally:
        server.stop()
