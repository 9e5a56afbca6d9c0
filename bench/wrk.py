"""Non-streaming load with wrk: a POST of a fixed JSON body at a fixed concurrency.

wrk's Lua `done()` hook prints the numbers as one JSON line, so nothing depends on the layout of
its human-readable summary. Any non-2xx answer or socket error makes the run invalid.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from bench.stack import BenchError

_MARK = "WRKJSON "
_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(auth)s
-- No response() hook on purpose: defining one makes wrk hand every answer to Lua.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,' ..
    '"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,"timeouts":%%d,' ..
    '"non_2xx":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%f,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    url: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    non_2xx: int

    def to_dict(self) -> dict:
        return asdict(self)


def _lua_string(text: str) -> str:
    # JSON string syntax is valid Lua for the ASCII bodies used here.
    return json.dumps(text)


def run_wrk(
    url: str,
    body: dict,
    connections: int,
    seconds: float,
    token: str | None = None,
    threads: int = 1,
    check: bool = True,
) -> WrkResult:
    """Run wrk for `seconds` with `connections` open connections and return its numbers.

    With `check`, a run with any non-2xx answer or socket error raises `BenchError`.
    """
    auth = f'wrk.headers["Authorization"] = {_lua_string("Bearer " + token)}' if token else ""
    script = _SCRIPT % {"body": _lua_string(json.dumps(body)), "auth": auth, "mark": _MARK}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as handle:
        handle.write(script)
        handle.flush()
        argv = [
            "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds:g}s",
            "--timeout", "10s", "--latency", "-s", handle.name, url,
        ]  # fmt: skip
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    line = next((x for x in proc.stdout.splitlines() if x.startswith(_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed (exit {proc.returncode}) on {url}:\n{proc.stdout}\n{proc.stderr}"
        )
    raw = json.loads(line[len(_MARK) :])
    errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    seconds_run = raw["duration_us"] / 1e6
    result = WrkResult(
        url=url,
        connections=connections,
        requests=raw["requests"],
        seconds=seconds_run,
        rps=raw["requests"] / seconds_run if seconds_run else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors=errors,
        non_2xx=raw["non_2xx"],
    )
    if check and (result.non_2xx or result.errors or not result.requests):
        raise BenchError(
            f"wrk against {url} at c={connections}: {result.requests} requests, "
            f"{result.non_2xx} non-2xx answers, {errors} socket errors "
            f"(connect {raw['connect_errors']}, read {raw['read_errors']}, "
            f"write {raw['write_errors']}, timeout {raw['timeouts']})\n{proc.stdout}"
        )
    return result
