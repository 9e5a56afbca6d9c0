"""The per-process admission gate for batch lines, against a real Redis (and a second process)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from jobs.admission import AdmissionGate
from runtimes.leases import LeaseSet

PREFIX = "test:inflight"


def _calls(client, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def _run_lines(gate: AdmissionGate, model: str, lines: int, threads: int, seconds: float,
               priority: int = 0, peak: list | None = None, order: list | None = None,
               tag: object = None) -> None:
    """`lines` calls of `seconds` each under the gate, from `threads` threads."""
    todo = list(range(lines))
    lock = threading.Lock()
    running = [0]

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            lease = gate.acquire(model, priority, lambda: True)
            assert lease is not None
            with lock:
                running[0] += 1
                if peak is not None:
                    peak.append(running[0])
                if order is not None:
                    order.append(tag)
            time.sleep(seconds)
            with lock:
                running[0] -= 1
            gate.release(model, lease)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)


def test_the_cap_holds_and_leases_pass_from_line_to_line_without_redis(redis_db):
    leases = LeaseSet(redis_db, PREFIX)
    gate = AdmissionGate(leases, lambda model: 4)
    before = {c: _calls(redis_db, c) for c in ("evalsha", "zrem")}
    peak: list[int] = []
    _run_lines(gate, "m", lines=400, threads=16, seconds=0.002, peak=peak)
    assert max(peak) <= 4
    assert max(peak) == 4  # the cap was used, not just respected
    round_trips = sum(_calls(redis_db, c) - n for c, n in before.items())
    # One lease per line taken and given back would be 800 round trips; handing leases on
    # leaves the filler's polls (every 50 ms) and the syncs (every 0.5 s).
    assert round_trips < 200, round_trips
    assert leases.held("m") == 0  # every lease went back once nobody waited
    assert gate.in_use("m") == 0


def test_higher_priority_lines_get_the_next_lease(redis_db):
    gate = AdmissionGate(LeaseSet(redis_db, PREFIX), lambda model: 1)
    first = gate.acquire("m", 0, lambda: True)  # holds the only slot
    order: list[str] = []
    waiting = []
    for priority, name in ((0, "low-1"), (0, "low-2"), (9, "high"), (5, "mid")):
        def wait(priority=priority, name=name) -> None:
            lease = gate.acquire("m", priority, lambda: True)
            order.append(name)
            time.sleep(0.01)
            gate.release("m", lease)
        waiting.append(threading.Thread(target=wait))
        waiting[-1].start()
        time.sleep(0.05)  # arrive in this order
    gate.release("m", first)
    for thread in waiting:
        thread.join(10)
    assert order == ["high", "mid", "low-1", "low-2"]


def test_a_waiting_line_whose_job_stopped_gets_no_lease(redis_db):
    gate = AdmissionGate(LeaseSet(redis_db, PREFIX), lambda model: 1, check_seconds=0.1)
    held = gate.acquire("m", 0, lambda: True)  # the only slot
    running = threading.Event()
    running.set()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire("m", 0, running.is_set)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # the cap is full: it waits
    started = time.monotonic()
    running.clear()  # its job was cancelled
    waiter.join(5)
    assert got == [None]
    assert time.monotonic() - started < 1.0
    gate.release("m", held)
    assert LeaseSet(redis_db, PREFIX).held("m") == 0


def test_a_lowered_cap_takes_effect_within_a_sync(redis_db):
    """The autoscaler halves the cap when realtime needs the engine: lines in flight follow."""
    cap = [8]
    gate = AdmissionGate(LeaseSet(redis_db, PREFIX), lambda model: cap[0], sync_seconds=0.2)
    leases = LeaseSet(redis_db, PREFIX)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(leases.held("m"))
            time.sleep(0.02)

    runner = threading.Thread(target=_run_lines, args=(gate, "m", 600, 16, 0.01))
    sampler = threading.Thread(target=sample)
    runner.start()
    sampler.start()
    time.sleep(0.5)
    assert max(samples) == 8
    cap[0] = 2
    time.sleep(0.6)  # a sync (0.2 s) and the lines that held the surplus (10 ms each)
    mark = len(samples)
    time.sleep(0.3)
    after = samples[mark:]
    done.set()
    runner.join(30)
    sampler.join(5)
    assert after and max(after) <= 2, after


def test_leases_lost_in_redis_are_not_handed_on(redis_db):
    """Redis forgot the leases (a restart without AOF): the gate stops counting them as its own
    and takes fresh ones, so the cap still holds."""
    leases = LeaseSet(redis_db, PREFIX)
    gate = AdmissionGate(leases, lambda model: 2, sync_seconds=0.05)
    first = gate.acquire("m", 0, lambda: True)
    redis_db.delete(f"{PREFIX}:m")
    time.sleep(0.1)
    second = gate.acquire("m", 0, lambda: True)  # taken fresh from Redis
    gate.release("m", second)  # nobody waits: back to Redis; and a sync notices `first` is lost
    assert gate.in_use("m") == 0
    gate.release("m", first)  # not handed on, not counted
    assert leases.held("m") == 0


def test_two_processes_share_a_full_cap(redis_server, redis_db):
    """A process that keeps handing its leases on must still leave a fair share to another
    process whose lines wait for the same model."""
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, threading, time, redis
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).resolve().parents[2])!r})
from runtimes.leases import LeaseSet
from jobs.admission import AdmissionGate
gate = AdmissionGate(LeaseSet(redis.Redis.from_url("{redis_server.url}/1"), "{PREFIX}"),
                     lambda model: 8, sync_seconds=0.2)
def worker():
    while True:
        lease = gate.acquire("m", 0, lambda: True)
        time.sleep(0.01)
        gate.release("m", lease)
for _ in range(16):
    threading.Thread(target=worker, daemon=True).start()
print("running", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "running"
        time.sleep(1.0)  # the child holds the whole cap by now
        leases = LeaseSet(redis_db, PREFIX)
        assert leases.held("m") == 8
        gate = AdmissionGate(leases, lambda model: 8, sync_seconds=0.2)
        peak: list[int] = []
        started = time.monotonic()
        _run_lines(gate, "m", lines=300, threads=16, seconds=0.01, peak=peak)
        took = time.monotonic() - started
        # Without a fair share this process would get a lease only when all the child's lines
        # ended at once, which they never do: it would wait for the child to exit (60 s).
        assert child.poll() is None
        assert took < 15, took
        assert max(peak) >= 3, max(peak)
    finally:
        child.kill()
        child.wait()
