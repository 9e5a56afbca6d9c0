"""Sampling profile of one gateway worker under load, with py-spy, summarised as hot functions.

py-spy is not a dependency of the project: `.venv/bin/pip install py-spy` before `--profile`.
The raw (collapsed-stack) output is kept next to the report; speedscope.app opens it as is.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.stack import BenchError


def py_spy() -> str:
    local = Path(sys.executable).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def record(pid: int, seconds: float, output: Path, rate: int = 200) -> subprocess.Popen:
    """Start sampling `pid` for `seconds`; the caller waits for the returned process."""
    # --function groups samples by function rather than by line; --nonblocking does not stop
    # the worker for each sample, so the profile disturbs the measured process less. --gil keeps
    # only samples that hold the GIL, i.e. Python running: on 2 shared cores the worker is often
    # preempted inside send() right after waking the engine, and without --gil that wait shows
    # up as send() "self time" (about a quarter of all samples) although it costs no CPU.
    return subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--duration", f"{seconds:g}",
         "--rate", str(rate), "--format", "raw", "--function", "--nonblocking", "--gil",
         "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _package(frame: str) -> str:
    """`func (gevent/_socketcommon.py:712)` -> `gevent`; the standard library is marked."""
    where = frame.rpartition(" (")[2].rstrip(")")
    path = where.rsplit(":", 1)[0]
    if path.startswith("<frozen "):
        path = path.removeprefix("<frozen ").rstrip(">")
    name = path.partition("/")[0].removesuffix(".py") or "?"
    return f"{name} (stdlib)" if name in sys.stdlib_module_names else name


def _is_gateway_code(frame: str) -> bool:
    where = frame.rpartition(" (")[2]
    return where.startswith(("webapp/", "runtimes/", "config/", "tasks/", "jobs/", "services/"))


def summarise(raw: str, top: int = 10) -> dict:
    """Hot functions from py-spy's collapsed stacks.

    `self`: samples in which the function itself was running (where the CPU goes);
    `packages`: the same summed by package (which layer costs most);
    `gateway_inclusive`: the project's own functions with everything they call (what to change).
    """
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        # A recursive function is counted once per stack for its inclusive time.
        for frame in set(frames):
            if _is_gateway_code(frame):
                inclusive[frame] += count
    return {
        "samples": total,
        "self": own.most_common(top),
        "packages": packages.most_common(top),
        "gateway_inclusive": inclusive.most_common(top),
    }
