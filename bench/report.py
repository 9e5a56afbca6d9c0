"""The markdown report of `bench.realtime`: one table per scenario, the targets, and the method.

Everything here works on the plain results dict (also written as JSON next to the report), so a
report can be re-rendered from a saved run: `python -m bench.report bench/results/realtime.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.tables import markdown_table

# Quoted from the issue: LiteLLM proxy 1.108.7 under uvicorn, on a 2-core machine of this kind,
# against a 0 ms fake engine. Not measured by this bench.
LITELLM = {
    "rps_c64": {1: 93, 2: 171},
    "added_p50_c1_ms": 12.7,
    "added_ttft_ms": 11,
    "streams_per_s": 21,
    "engine_streams_per_s": 173,
    "rss_mb": 330,
}
QUOTED = "LiteLLM 1.108.7 (quoted from the issue, not measured here)"

TARGETS = {
    "added_p50_c1_ms": 2.0,
    "added_ttft_p50_ms": 2.0,
    "rps_c64": {1: 465, 2: 855},
    "stream_ratio": 0.90,
    "rss_mb": 150,
}


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _added(gateway: float | None, direct: float | None) -> str:
    if gateway is None or direct is None:
        return "n/a"
    return f"{gateway - direct:+.2f} ms"


def _ratio(gateway: float, direct: float) -> str:
    return f"{gateway / direct:.2f}x" if direct else "n/a"


def _workers(n: int) -> str:
    return f"{n} worker" + ("s" if n > 1 else "")


def _find(items: list[dict], workers: int, concurrency: int) -> dict | None:
    for item in items:
        if item["workers"] == workers and item["concurrency"] == concurrency:
            return item
    return None


def nonstream_rows(results: dict) -> list[list[str]]:
    rows = []
    for item in results["nonstream"]:
        w, c = item["workers"], item["concurrency"]
        d, g = item["direct"], item["gateway"]
        label = f"{_workers(w)}, c={c}"
        litellm_rps = str(LITELLM["rps_c64"][w]) + " req/s" if c == 64 else "-"
        litellm_p50 = f"+{LITELLM['added_p50_c1_ms']} ms" if c == 1 else "-"
        rows += [
            [f"{label}: requests/s", f"{d['rps']:.0f}", f"{g['rps']:.0f}",
             _ratio(g["rps"], d["rps"]), litellm_rps],
            [f"{label}: p50 latency", _ms(d["p50_ms"]), _ms(g["p50_ms"]),
             _added(g["p50_ms"], d["p50_ms"]), litellm_p50],
            [f"{label}: p99 latency", _ms(d["p99_ms"]), _ms(g["p99_ms"]),
             _added(g["p99_ms"], d["p99_ms"]), "-"],
        ]  # fmt: skip
    return rows


def stream_rows(results: dict) -> list[list[str]]:
    rows = []
    for item in results["stream"]:
        w, c = item["workers"], item["concurrency"]
        d, g = item["direct"], item["gateway"]
        label = f"{_workers(w)}, {c} stream" + ("s" if c > 1 else "")
        if c > 1:
            rows.append([
                f"{label}: streams/s", f"{d['streams_per_s']:.1f}", f"{g['streams_per_s']:.1f}",
                _ratio(g["streams_per_s"], d["streams_per_s"]),
                f"{LITELLM['streams_per_s']} (engine alone {LITELLM['engine_streams_per_s']})"
                if w == 1 else "-",
            ])  # fmt: skip
        rows += [
            [f"{label}: TTFT p50", _ms(d["ttft_p50_ms"]), _ms(g["ttft_p50_ms"]),
             _added(g["ttft_p50_ms"], d["ttft_p50_ms"]),
             f"+{LITELLM['added_ttft_ms']} ms" if c == 1 else "-"],
            [f"{label}: TTFT p95", _ms(d["ttft_p95_ms"]), _ms(g["ttft_p95_ms"]),
             _added(g["ttft_p95_ms"], d["ttft_p95_ms"]), "-"],
            [f"{label}: whole stream p50", _ms(d["duration_p50_ms"]),
             _ms(g["duration_p50_ms"]), _added(g["duration_p50_ms"], d["duration_p50_ms"]), "-"],
        ]  # fmt: skip
    return rows


def resource_rows(results: dict) -> list[list[str]]:
    rows = []
    for item in results["nonstream"]:
        rows.append([
            f"non-streaming, {_workers(item['workers'])}, c={item['concurrency']}",
            f"{item['gateway_cpu_per_1000']:.2f} s per 1000 requests",
            f"{item['gateway_cpu_s']:.1f} s CPU over {item['gateway']['seconds']:.1f} s",
        ])  # fmt: skip
    for item in results["stream"]:
        rows.append([
            f"streaming, {_workers(item['workers'])}, {item['concurrency']} concurrent",
            f"{item['gateway_cpu_per_1000']:.2f} s per 1000 streams",
            f"{item['gateway_cpu_s']:.1f} s CPU over {item['gateway']['wall_seconds']:.1f} s "
            f"(client used {item['gateway']['client_cpu_util'] * 100:.0f}% of a core)",
        ])  # fmt: skip
    for workers, per_pid in sorted(results["rss"].items(), key=lambda kv: int(kv[0])):
        sizes = ", ".join(f"{b / 2**20:.0f} MB" for b in per_pid.values())
        rows.append(
            [
                f"resident memory, {_workers(int(workers))}",
                f"max per worker: {sizes}",
                f"{QUOTED}: {LITELLM['rss_mb']} MB per worker",
            ]
        )
    return rows


def noise_rows(results: dict) -> list[list[str]]:
    rows = []
    for kind, items in (("non-streaming", results["nonstream"]), ("streaming", results["stream"])):
        for item in items:
            load = item.get("other_load")
            if load is None:
                continue
            unit = "c=" if kind == "non-streaming" else "streams="
            rows.append([
                f"{kind}, {_workers(item['workers'])}, {unit}{item['concurrency']}",
                f"{load['direct']:.0%}",
                f"{load['gateway']:.0%}",
                str(item.get("attempts", 1)),
            ])  # fmt: skip
    return rows


def target_rows(results: dict) -> list[list[str]]:
    rows = []

    def row(what, threshold, measured_text, ok, reference):
        rows.append([what, threshold, measured_text, "PASS" if ok else "FAIL", reference])

    ns1 = _find(results["nonstream"], 1, 1)
    if ns1:
        added = ns1["gateway"]["p50_ms"] - ns1["direct"]["p50_ms"]
        row(
            "added p50 latency, c=1, 1 worker",
            f"<= {TARGETS['added_p50_c1_ms']} ms",
            f"{added:+.2f} ms",
            added <= TARGETS["added_p50_c1_ms"],
            f"+{LITELLM['added_p50_c1_ms']} ms",
        )
    st1 = _find(results["stream"], 1, 1)
    if st1:
        added = st1["gateway"]["ttft_p50_ms"] - st1["direct"]["ttft_p50_ms"]
        row(
            "added TTFT p50, 1 stream, 1 worker",
            f"<= {TARGETS['added_ttft_p50_ms']} ms",
            f"{added:+.2f} ms",
            added <= TARGETS["added_ttft_p50_ms"],
            f"+{LITELLM['added_ttft_ms']} ms",
        )
    for workers in (1, 2):
        item = _find(results["nonstream"], workers, 64)
        if item:
            need = TARGETS["rps_c64"][workers]
            rps = item["gateway"]["rps"]
            row(
                f"non-streaming requests/s, c=64, {_workers(workers)}",
                f">= {need} (5x LiteLLM)",
                f"{rps:.0f} req/s",
                rps >= need,
                f"{LITELLM['rps_c64'][workers]} req/s",
            )
    for workers in (1, 2):
        item = _find(results["stream"], workers, 64)
        if item:
            ratio = item["gateway"]["streams_per_s"] / item["direct"]["streams_per_s"]
            reference = (
                f"{LITELLM['streams_per_s']} of {LITELLM['engine_streams_per_s']} streams/s "
                f"({LITELLM['streams_per_s'] / LITELLM['engine_streams_per_s']:.0%})"
            )
            row(
                f"64 concurrent streams, {_workers(workers)}: share of the engine's rate",
                f">= {TARGETS['stream_ratio']:.0%}",
                f"{ratio:.0%} ({item['gateway']['streams_per_s']:.1f} of "
                f"{item['direct']['streams_per_s']:.1f} streams/s)",
                ratio >= TARGETS["stream_ratio"],
                reference if workers == 1 else "-",
            )
    sizes = [b for per_pid in results["rss"].values() for b in per_pid.values()]
    if sizes:
        peak = max(sizes) / 2**20
        row(
            "resident memory per web worker (max sampled)",
            f"< {TARGETS['rss_mb']} MB",
            f"{peak:.0f} MB",
            peak < TARGETS["rss_mb"],
            f"{LITELLM['rss_mb']} MB",
        )
    return rows


def render(results: dict) -> str:
    meta = results["meta"]
    header = ["scenario", "direct (engine)", "gateway", "gateway/direct or added", QUOTED]
    out = [
        "# Realtime proxy benchmark: gateway vs engine direct",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}` (git {meta['git']})",
        f"- run time: {meta['run_seconds']:.0f} s",
        f"- other load on the machine just before the run: {meta['other_load_before']:.0%} of "
        'all cores (see "Other load" below)',
        "",
        "## Targets",
        "",
        *markdown_table(["target", "threshold", "measured", "result", QUOTED],
                        target_rows(results)),
        "",
        "## Non-streaming `/v1/completions` on `bench/zero` (engine answers at once)",
        "",
        f"wrk, {meta['wrk_seconds']:g} s per run after a 1 s warm-up, `max_tokens` 16.",
        "",
        *markdown_table(header, nonstream_rows(results)),
        "",
        "## Streaming `/v1/completions` on `bench/realistic` "
        "(50 ms to first token, 10 ms per token, 32 tokens)",
        "",
        "`bench.stream_client` (its own process), closed loop, each task on one keep-alive "
        f"connection; {meta['stream_c1_seconds']:g} s window for one stream, "
        f"{meta['stream_c64_seconds']:g} s for 64, after an unmeasured 1 s warm-up run and a "
        "0.5 s ramp over which the tasks start (so that streams do not run in lockstep). "
        "streams/s counts streams that ended inside the window; TTFT (request sent to first "
        "`data:` event) and whole-stream times are over streams begun inside it. Every stream "
        "must end with `data: [DONE]` after 32 token events.",
        "",
        *markdown_table(header, stream_rows(results)),
        "",
        "## Gateway resources",
        "",
        "CPU is user + system time of the gunicorn worker processes during the measured window "
        "(the master is idle); resident memory is the maximum sampled every 0.2 s per worker.",
        "",
        *markdown_table(["scenario", "gateway", "details"], resource_rows(results)),
        "",
        "## Other load on the machine",
        "",
        "Share of all cores used by processes outside the bench (and stolen by the host) during "
        "each measured run: busy CPU time of the machine minus that of the bench's own process "
        "tree. Above a few percent, the run's numbers are lower than the system can do. A "
        "scenario disturbed by more than 10 % was measured again (up to 3 attempts, within a "
        "time budget) and the least disturbed attempt is reported.",
        "",
        *markdown_table(["scenario", "during direct", "during gateway", "attempts"],
                        noise_rows(results)),
        "",
        "## How it was run",
        "",
        "Everything runs on this machine, on 127.0.0.1: a private redis, the gateway "
        "(`gunicorn -c webapp/gunicorn_conf.py webapp.wsgi:app`, gevent workers, access log "
        "off), the control worker (`celery -A tasks.worker worker -Q control,downloads -P "
        "threads -c 4 -B`) which started the two sim engines on the first call, and the load "
        'generator. "direct" sends the same requests to the engine\'s own port, found in the '
        'registry (`gw:runtimes`); "gateway" sends them through the gateway with a bearer '
        "token. Each gateway run comes right after its direct run.",
        "",
        "Caveat: the load generator, the gateway and the engine share the same 2 cores, so "
        "through the gateway the engine has less CPU than when it is called directly; on a "
        "shared, noisy machine numbers vary by some 10-20 % from run to run.",
    ]
    if results.get("profile"):
        prof = results["profile"]
        out += [
            "",
            f"## Profile of one gateway worker at c=64 ({prof['samples']} samples, py-spy)",
            "",
            "Sampled with `py-spy record --gil`: only moments when the worker runs Python count, "
            "so time spent preempted or in the kernel is left out (the worker's system time is "
            "about a tenth of its user time at this load).",
            "",
            f"Raw collapsed stacks: `{prof['file']}` (speedscope.app opens it). "
            f"Throughput while profiled: {prof['rps']:.0f} req/s.",
            "",
            "Hot functions (self time: the function itself was running):",
            "",
            *markdown_table(
                ["function (file:line)", "self samples", "self %"],
                [[f"`{f}`", str(n), f"{n / prof['samples']:.1%}"] for f, n in prof["self"]],
            ),
            "",
            "Self time by package:",
            "",
            *markdown_table(
                ["package", "self samples", "self %"],
                [[f"`{f}`", str(n), f"{n / prof['samples']:.1%}"] for f, n in prof["packages"]],
            ),
            "",
            "The gateway's own functions, inclusive of what they call:",
            "",
            *markdown_table(
                ["function (file:line)", "inclusive samples", "inclusive %"],
                [
                    [f"`{f}`", str(n), f"{n / prof['samples']:.1%}"]
                    for f, n in prof["gateway_inclusive"]
                ],
            ),
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/realtime.json")
    sys.stdout.write(render(json.loads(path.read_text())))
