"""CPU time and resident memory of the gateway's worker processes, and the machine's other load.

A background thread samples the RSS of every gunicorn worker a few times a second and keeps the
maximum per worker (a single reading at the end would miss the peak of a burst). CPU time is read
as user + system seconds summed over the workers, before and after a run. `OtherLoad` tells how
busy the (shared) machine was with work that is not the bench's during a run.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable

import psutil


class WorkerSampler:
    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.2):
        self._pids = pids
        self.interval = interval
        self.max_rss: dict[int, int] = {}
        self.seen: set[int] = set()
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _proc(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc

    def sample(self) -> None:
        with self._lock:
            for pid in self._pids():
                self.seen.add(pid)
                proc = self._proc(pid)
                if proc is None:
                    continue
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                if rss > self.max_rss.get(pid, 0):
                    self.max_rss[pid] = rss

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the current workers, together."""
        total = 0.0
        with self._lock:
            for pid in self._pids():
                proc = self._proc(pid)
                if proc is None:
                    continue
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                total += times.user + times.system
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), including time stolen by the host."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def _own_seconds() -> float:
    """CPU seconds used by this process and every process below it, living or reaped.

    A live process counts with its reaped children (children_user/system); a child we reaped
    ourselves counts through RUSAGE_CHILDREN, which covers its own reaped descendants too, so a
    process that ends between two readings is neither lost nor counted twice.
    """
    total = 0.0
    try:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
    except psutil.Error:
        procs = []
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        if proc.pid == me.pid:
            total += t.user + t.system  # its reaped children come from RUSAGE_CHILDREN below
        else:
            total += t.user + t.system + t.children_user + t.children_system
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + reaped.ru_utime + reaped.ru_stime


class OtherLoad:
    """How much of the machine processes outside the bench (and the hypervisor) took meanwhile.

    The machine is shared; a number measured while another job ran is worth less, and the
    report says so instead of hiding it.
    """

    def __init__(self) -> None:
        self._start = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds())

    def stop(self) -> float:
        """The share of all cores (0..1) used by others since `start`."""
        wall0, busy0, own0 = self._start
        wall = time.monotonic() - wall0
        others = (_busy_seconds() - busy0) - (_own_seconds() - own0)
        cores = psutil.cpu_count() or 1
        return max(0.0, others / (wall * cores)) if wall > 0 else 0.0
