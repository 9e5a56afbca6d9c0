"""The batch benchmark (issue #4's speed targets), measured side by side in one run:

    .venv/bin/python -m bench.batch [--quick] [--memory-lines N]

Brings the system up on 127.0.0.1 (redis, gunicorn, the control worker, the batch worker as
`make run` starts it: `celery -A tasks.worker worker -Q batch -P gevent -c 64`, and two sim
engines; see `bench.stack`), then measures:

1. throughput: a 10,000-line batch through `/v1/batches` (official `openai` SDK), timed from
   `batches.create` to `completed`, beside a direct asyncio + aiohttp client (its own process)
   sending the same bodies to the engine's port with the orchestrator's concurrency cap per
   engine (BATCH_MAX_INFLIGHT_PER_RUNTIME, 64). The target is measured on a sim engine timed
   like a GPU engine (50 ms to first token, 10 ms per token, max_tokens 16: 200 ms a line), where
   what counts is whether the orchestrator keeps the cap's slots as full as a direct client does.
   The same pair runs again on a sim engine that answers at once: no GPU answers in 0 ms, so
   that ratio has no target; it shows the orchestrator's own CPU cost per line against the
   client's, on cores the engine shares;
2. memory: the peak resident memory of the web workers and the batch worker during a 2,000-line
   batch and during the 10,000-line one on the GPU-like engine (sampled every 0.2 s), and with
   `--memory-lines N` during an N-line one too;
3. realtime under batch: TTFT of 4 concurrent realtime streams on the GPU-like engine alone,
   then while a 20,000-line batch runs on it.

The machine is shared: each phase reports the share of the cores other processes used meanwhile,
and a realtime run during which they took more than 10 % is measured once more (the quieter of
the two is kept).

Writes `bench/results/batch.md` (and `.json`) and prints it. Exit status: 0 when the report was
written, PASS or FAIL; 1 when the system could not be brought up or the bench is void (a request
failed); 130 when interrupted. Everything it started is stopped in every case.

`python -m bench.batch --direct-client ...` is the direct client itself (used internally).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from bench.procstat import OtherLoad, WorkerSampler
from bench.realtime import git_revision, machine
from bench.stack import REPO_ROOT, TOKEN, BenchError, Stack
from bench.tables import markdown_table

RESULTS_DIR = REPO_ROOT / "bench" / "results"
ZERO, REALISTIC = "bench/batch-zero", "bench/batch-realistic"
UPLOAD_TOKEN, BATCH_TOKEN = "example-upload-token", "example-batch-token"
PER_RUNTIME = int(os.environ.get("BATCH_MAX_INFLIGHT_PER_RUNTIME", "64"))
STREAMS, STREAM_TOKENS = 4, 32
FINAL = ("completed", "failed", "cancelled", "expired")

CATALOG = {
    "models": [
        {
            "id": ZERO,
            "engine": "sim",
            "gpus": 0,
            "idle_timeout_seconds": 3600,
            "expected_start_seconds": 2,
            # The same cap as the direct client's, whatever the engine's slots.
            "batch_max_inflight": PER_RUNTIME,
            "engine_args": {"sim": ["--tpot-ms", "0", "--max-concurrency", "1024"]},
        },
        {
            "id": REALISTIC,
            "engine": "sim",
            "gpus": 0,
            "idle_timeout_seconds": 3600,
            "expected_start_seconds": 2,
            "batch_max_inflight": PER_RUNTIME,
            "engine_args": {
                "sim": ["--ttft-ms", "50", "--tpot-ms", "10", "--max-concurrency", "96"]
            },
        },
    ]
}

TARGETS = {"throughput_ratio": 0.90, "rss_growth_mb": 30.0, "ttft_p95_ratio": 1.20}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bodies(model: str, count: int, max_tokens: int) -> list[dict]:
    return [{"model": model, "prompt": f"line {i}", "max_tokens": max_tokens} for i in range(count)]


# -- the direct client (its own process) ------------------------------------------------------


async def _direct(url: str, model: str, lines: int, concurrency: int, max_tokens: int) -> dict:
    import aiohttp

    payloads = [json.dumps(b).encode() for b in bodies(model, lines, max_tokens)]
    headers = {"Content-Type": "application/json"}
    out = {"ok": 0, "errors": 0, "error_samples": []}

    async def one(session: aiohttp.ClientSession, payload: bytes, count: bool) -> None:
        try:
            async with session.post(url, data=payload, headers=headers) as answer:
                data = await answer.read()
                good = answer.status == 200 and b'"choices"' in data
                problem = f"status {answer.status}: {data[:200]!r}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            good, problem = False, f"{type(exc).__name__}: {exc}"
        if not count:
            return
        if good:
            out["ok"] += 1
        else:
            out["errors"] += 1
            if len(out["error_samples"]) < 5:
                out["error_samples"].append(problem)

    async def worker(session: aiohttp.ClientSession, queue: list[bytes]) -> None:
        while queue:
            await one(session, queue.pop(), True)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Unmeasured: open the connections, as the batch worker's pool is by the time it runs.
        await asyncio.gather(*(one(session, payloads[0], False) for _ in range(concurrency)))
        queue = list(reversed(payloads))
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, queue) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        **out,
        "lines": lines,
        "concurrency": concurrency,
        "seconds": seconds,
        "lines_per_s": out["ok"] / seconds,
        "client_cpu_util": cpu / seconds,
    }


def direct_client(url: str, model: str, lines: int, concurrency: int, max_tokens: int) -> dict:
    """Run the direct client as its own process, so its CPU is not ours."""
    argv = [
        sys.executable,
        "-m",
        "bench.batch",
        "--direct-client",
        url,
        "--model",
        model,
        "--lines",
        str(lines),
        "--concurrency",
        str(concurrency),
        "--max-tokens",
        str(max_tokens),
    ]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"direct client failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(proc.stdout)
    if result["errors"] or result["ok"] != lines:
        raise BenchError(
            f"direct client: {result['errors']} errors, {result['ok']} of {lines} "
            f"ok: {result['error_samples']}"
        )
    return result


# -- batches through the gateway ----------------------------------------------------------------


class Batches:
    """Upload, create and follow batches with the official SDK, as a user would."""

    def __init__(self, base: str):
        import openai

        self.upload = openai.OpenAI(
            base_url=f"{base}/v1", api_key=UPLOAD_TOKEN, max_retries=0, timeout=120
        )
        self.batch = openai.OpenAI(
            base_url=f"{base}/v1", api_key=BATCH_TOKEN, max_retries=0, timeout=60
        )

    def upload_lines(self, model: str, count: int, max_tokens: int) -> str:
        lines = b"".join(
            json.dumps(
                {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}
            ).encode()
            + b"\n"
            for i, body in enumerate(bodies(model, count, max_tokens))
        )
        uploaded = self.upload.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
        return uploaded.id

    def create(self, file_id: str):
        return self.batch.batches.create(
            input_file_id=file_id, endpoint="/v1/completions", completion_window="24h"
        )

    def wait(self, batch_id: str, stack: Stack, timeout: float, until=None):
        """Poll every 0.1 s until the batch is final (or `until(batch)` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.batch.batches.retrieve(batch_id)
            if batch.status in FINAL or (until is not None and until(batch)):
                return batch
            if time.monotonic() > deadline:
                raise BenchError(
                    f"batch {batch_id} still {batch.status} after {timeout:.0f} s "
                    f"({batch.request_counts})"
                )
            stack.check_running()
            time.sleep(0.1)

    def output_lines(self, file_id: str | None) -> int:
        if file_id is None:
            return 0
        return len(self.batch.files.content(file_id).text.splitlines())


def _mb(value: float) -> float:
    return value / 2**20


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """User + system CPU seconds so far of web workers, batch worker and engines: which of them
    is the bottleneck of a batch shows as the one near 100 % of a core."""
    groups = {"web": stack.worker_pids(), "batch": stack.batch_pids(),
              "engines": stack.engine_pids(),
              "redis": [stack.redis_proc.pid] if stack.redis_proc else []}  # fmt: skip
    out = {}
    for name, pids in groups.items():
        total = 0.0
        for pid in pids:
            try:
                main = psutil.Process(pid)
                # An engine's group leader may be a wrapper: count what it runs, too.
                procs = [main, *main.children(recursive=True)] if name == "engines" else [main]
                for proc in procs:
                    times = proc.cpu_times()
                    total += times.user + times.system
            except psutil.Error:
                continue
        out[name] = total
    return out


def run_batch(stack: Stack, batches: Batches, model: str, lines: int, max_tokens: int) -> dict:
    """One batch from upload to `completed`, with the peak RSS of web and batch processes."""
    web_pids = set(stack.worker_pids())
    sampler = WorkerSampler(lambda: stack.worker_pids() + stack.batch_pids())
    others = OtherLoad()
    sampler.sample()
    baseline = dict(sampler.max_rss)
    sampler.start()
    others.start()
    cpu_before = cpu_seconds(stack)
    try:
        with EngineWatch(stack, model) as watch:
            file_id = batches.upload_lines(model, lines, max_tokens)
            started = time.monotonic()
            batch = batches.create(file_id)
            done = batches.wait(batch.id, stack, timeout=300)
            seconds = time.monotonic() - started
    finally:
        sampler.stop()
    cpu_after = cpu_seconds(stack)
    other_load = others.stop()
    counts = done.request_counts
    if done.status != "completed" or counts.completed != lines or counts.failed:
        raise BenchError(f"batch of {lines} ended {done.status} with {counts}")
    output = batches.output_lines(done.output_file_id)
    if output != lines:
        raise BenchError(f"batch of {lines}: {output} lines in its output file")

    def total(peaks: dict[int, int], web: bool) -> float:
        return _mb(sum(b for pid, b in peaks.items() if (pid in web_pids) == web))

    return {
        "lines": lines,
        "status": done.status,
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "seconds": seconds,
        "lines_per_s": lines / seconds,
        "server_seconds": (done.completed_at or 0) - (done.created_at or 0),
        "rss_peak_mb": {str(pid): _mb(b) for pid, b in sampler.max_rss.items()},
        "web_peak_mb": total(sampler.max_rss, True),
        "batch_peak_mb": total(sampler.max_rss, False),
        "web_before_mb": total(baseline, True),
        "batch_before_mb": total(baseline, False),
        "other_load": other_load,
        # Upload included: shares of one core over the batch's wall time.
        "cpu_util": {k: (cpu_after[k] - cpu_before[k]) / seconds for k in cpu_after},
        "engine": watch.summary(),
    }


# -- realtime with and without batch --------------------------------------------------------------


def stream_load(stack: Stack, seconds: float) -> dict:
    assert stack.gateway is not None
    argv = [
        sys.executable,
        "-m",
        "bench.stream_client",
        "--url",
        f"{stack.gateway.base}/v1/completions",
        "--model",
        REALISTIC,
        "--concurrency",
        str(STREAMS),
        "--seconds",
        f"{seconds:g}",
        "--max-tokens",
        str(STREAM_TOKENS),
        "--token",
        TOKEN,
    ]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=seconds + 90, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"stream client failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(proc.stdout)
    if result["errors"] or not result["completed"]:
        raise BenchError(
            f"realtime streams: {result['errors']} failed, {result['completed']} "
            f"completed: {result['error_samples']}"
        )
    return result


class EngineWatch:
    """Samples, every 0.2 s, the engine's queue (its /metrics), the batch cap the autoscaler set
    and the batch leases held: what admission control saw and did while realtime was measured."""

    def __init__(self, stack: Stack, model: str):
        import urllib3

        self.url = f"{stack.engine_endpoint(model).base}/metrics"
        self.redis = stack.redis
        self.model = model
        self.http = urllib3.PoolManager(maxsize=1, retries=False)
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-watch", daemon=True)

    def _gauge(self, text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                text = self.http.request("GET", self.url, timeout=2.0).data.decode()
                cap = self.redis.hget("gw:batch_caps", self.model)
                leases = self.redis.zcard(f"gw:batch_inflight:{self.model}")
            except Exception:  # a missed sample is not worth failing the bench
                continue
            self.samples.append(
                {
                    "running": self._gauge(text, "vllm:num_requests_running"),
                    "waiting": self._gauge(text, "vllm:num_requests_waiting"),
                    "cap": int(cap) if cap is not None else None,
                    "batch_inflight": leases,
                }
            )

    def __enter__(self) -> EngineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        def stats(key: str) -> dict:
            values = [s[key] for s in self.samples if s[key] is not None]
            if not values:
                return {"min": None, "mean": None, "max": None}
            return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}

        return {
            "samples": len(self.samples),
            "waiting_samples": sum(1 for s in self.samples if s["waiting"] > 0),
            **{k: stats(k) for k in ("running", "waiting", "cap", "batch_inflight")},
        }


QUIET = 0.10  # other processes' share of the cores above which a realtime run is measured again


def _quietest(measure, attempts: int = 2) -> dict:
    """Run `measure` (which returns a dict with `other_load`) again when the shared machine was
    busy meanwhile, up to `attempts` times; keep the least disturbed run."""
    best: dict | None = None
    for attempt in range(1, attempts + 1):
        result = measure()
        result["attempts"] = attempt
        if best is None or result["other_load"] < best["other_load"]:
            best = result
        if result["other_load"] <= QUIET:
            break
        log(f"  other processes used {result['other_load']:.0%} of the machine: measuring again")
    assert best is not None
    return best


def realtime_under_batch(stack: Stack, batches: Batches, lines: int, seconds: float) -> dict:
    stream_load(stack, 1.0)  # unmeasured: connections and the gateway's pool to the engine

    def alone_run() -> dict:
        others = OtherLoad()
        others.start()
        result = stream_load(stack, seconds)
        return {"streams": result, "other_load": others.stop()}

    alone = _quietest(alone_run)
    log(
        f"  realtime alone: TTFT p50 {alone['streams']['ttft_p50_ms']:.1f} ms, "
        f"p95 {alone['streams']['ttft_p95_ms']:.1f} ms"
    )

    file_id = batches.upload_lines(REALISTIC, lines, STREAM_TOKENS)
    batch = batches.create(file_id)
    # Measure only once the batch runs at its full rate: its first lines done, then a moment.
    batches.wait(batch.id, stack, 120, until=lambda b: b.request_counts.completed >= 64)
    time.sleep(2.0)

    def mixed_run() -> dict:
        others = OtherLoad()
        with EngineWatch(stack, REALISTIC) as watch:
            before = batches.batch.batches.retrieve(batch.id).request_counts.completed
            others.start()
            began = time.monotonic()
            result = stream_load(stack, seconds)
            took = time.monotonic() - began
            load = others.stop()
            during = batches.batch.batches.retrieve(batch.id)
        if during.status != "in_progress":
            raise BenchError(f"the batch was {during.status} before realtime was measured")
        if during.request_counts.failed:
            raise BenchError(f"batch lines failed during the mixed run: {during.request_counts}")
        return {
            "streams": result,
            "other_load": load,
            "batch_lines_per_s": (during.request_counts.completed - before) / took,
            "engine": watch.summary(),
        }

    mixed = _quietest(mixed_run)
    log(
        f"  realtime with batch: TTFT p50 {mixed['streams']['ttft_p50_ms']:.1f} ms, p95 "
        f"{mixed['streams']['ttft_p95_ms']:.1f} ms; batch {mixed['batch_lines_per_s']:.0f} "
        "lines/s meanwhile"
    )
    # The batch has served its purpose; cancelling it keeps the bench short.
    batches.batch.batches.cancel(batch.id)
    ended = batches.wait(batch.id, stack, 120)
    return {
        "alone": alone["streams"],
        "mixed": mixed["streams"],
        "batch_lines": lines,
        "batch_lines_per_s": mixed["batch_lines_per_s"],
        "batch_final": ended.status,
        "batch_done_at_cancel": ended.request_counts.completed,
        "engine": mixed["engine"],
        "other_load": {"alone": alone["other_load"], "mixed": mixed["other_load"]},
        "attempts": {"alone": alone["attempts"], "mixed": mixed["attempts"]},
    }


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    before = OtherLoad()
    before.start()
    time.sleep(2.0)
    big, small, mixed_lines = (2000, 500, 5000) if args.quick else (10_000, 2000, 20_000)
    rt_seconds = 5.0 if args.quick else 15.0
    results: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(),
            "command": " ".join([".venv/bin/python -m bench.batch", *args.argv]).strip(),
            "git": git_revision(),
            "other_load_before": before.stop(),
            "per_runtime_cap": PER_RUNTIME,
            "quick": args.quick,
        },
    }
    with Stack(RESULTS_DIR / "logs-batch", catalog=CATALOG) as stack:
        # Uploaded and output files stay in the stack's temp dir, not in the repo's var/.
        stack.extra_env.update(
            FILES_DIR=str(stack.tmp / "files"), BATCH_MAX_INFLIGHT_PER_RUNTIME=str(PER_RUNTIME)
        )
        log("starting redis, the control worker, the batch worker and gunicorn (2 workers)")
        stack.start_redis()
        stack.start_celery()
        stack.start_batch_worker(64)
        stack.start_gateway(2)
        for model in (ZERO, REALISTIC):
            took = stack.warm_up(model)
            log(f"{model} served through the gateway after {took:.1f} s")
        batches = Batches(stack.gateway.base)
        # An unmeasured batch warms the batch worker's imports, pools and the engine's path.
        run_batch(stack, batches, ZERO, 200, 16)

        for key, model, label in (("", REALISTIC, "GPU-like engine"),
                                  ("zero_", ZERO, "engine that answers at once")):
            if key == "":
                log(f"memory: {small}-line batch on the {label}")
                results["small"] = run_batch(stack, batches, model, small, 16)
                log(f"  {results['small']['lines_per_s']:.0f} lines/s")
            log(f"throughput: {big}-line batch on the {label}")
            results[f"{key}big"] = run_batch(stack, batches, model, big, 16)
            took = results[f"{key}big"]
            log(f"  {took['lines_per_s']:.0f} lines/s in {took['seconds']:.1f} s")
            endpoint = stack.engine_endpoint(model)
            log(f"direct client: {big} requests to {endpoint.base}, {PER_RUNTIME} at a time")
            others = OtherLoad()
            others.start()
            direct = direct_client(f"{endpoint.base}/v1/completions", model, big, PER_RUNTIME, 16)
            direct["other_load"] = others.stop()
            results[f"{key}direct"] = direct
            log(f"  {direct['lines_per_s']:.0f} lines/s")

        if args.memory_lines:
            log(f"memory: {args.memory_lines}-line batch on the GPU-like engine")
            results["memory_extra"] = run_batch(stack, batches, REALISTIC, args.memory_lines, 16)

        log(f"realtime TTFT, alone and beside a {mixed_lines}-line batch on {REALISTIC}")
        results["realtime"] = realtime_under_batch(stack, batches, mixed_lines, rt_seconds)
        stack.check_running()
    results["meta"]["run_seconds"] = time.monotonic() - started
    return results


# -- the report ---------------------------------------------------------------------------------


def verdicts(results: dict) -> list[list[str]]:
    big, small, direct, rt = (
        results["big"],
        results["small"],
        results["direct"],
        results["realtime"],
    )
    ratio = big["lines_per_s"] / direct["lines_per_s"]
    growth = (big["web_peak_mb"] + big["batch_peak_mb"]) - (
        small["web_peak_mb"] + small["batch_peak_mb"]
    )
    ttft = rt["mixed"]["ttft_p95_ms"] / rt["alone"]["ttft_p95_ms"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    return [
        [
            f"throughput, {big['lines']}-line batch vs direct client (GPU-like engine)",
            f">= {TARGETS['throughput_ratio']:.0%} of direct",
            f"{ratio:.0%} ({big['lines_per_s']:.0f} vs {direct['lines_per_s']:.0f} lines/s)",
            verdict(ratio >= TARGETS["throughput_ratio"]),
        ],
        [
            f"memory flat: peak RSS (web + batch worker), {big['lines']} vs {small['lines']} lines",
            f"<= +{TARGETS['rss_growth_mb']:.0f} MB",
            f"{growth:+.1f} MB ({small['web_peak_mb'] + small['batch_peak_mb']:.0f} -> "
            f"{big['web_peak_mb'] + big['batch_peak_mb']:.0f} MB)",
            verdict(growth <= TARGETS["rss_growth_mb"]),
        ],
        [
            "realtime TTFT p95 with a batch running vs alone",
            f"<= {TARGETS['ttft_p95_ratio']:.2f}x",
            f"{ttft:.2f}x ({rt['alone']['ttft_p95_ms']:.1f} -> "
            f"{rt['mixed']['ttft_p95_ms']:.1f} ms)",
            verdict(ttft <= TARGETS["ttft_p95_ratio"]),
        ],
    ]


def render(results: dict) -> str:
    meta = results["meta"]
    big, small, direct, rt = (
        results["big"],
        results["small"],
        results["direct"],
        results["realtime"],
    )
    eng = rt["engine"]
    queued = eng["waiting_samples"]

    def num(value, fmt=".0f") -> str:
        return "n/a" if value is None else format(value, fmt)

    phases = {
        "before the run": meta["other_load_before"],
        f"{small['lines']}-line batch": small["other_load"],
        f"{big['lines']}-line batch": big["other_load"],
        "direct client": direct["other_load"],
        **({"batch on the engine that answers at once": results["zero_big"]["other_load"],
            "direct client on it": results["zero_direct"]["other_load"]}
           if "zero_big" in results else {}),
        "realtime alone": rt["other_load"]["alone"],
        "realtime with the batch": rt["other_load"]["mixed"],
    }
    busy = [f"{name} ({load:.0%})" for name, load in phases.items() if load > 0.10]
    out = [
        "# Batch benchmark: throughput, memory, realtime beside batch",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}` (git {meta['git']})",
        f"- run time: {meta['run_seconds']:.0f} s",
        "- other load on the machine (share of all cores used by processes outside the bench): "
        + ", ".join(f"{name} {load:.0%}" for name, load in phases.items())
        + (
            ". **The machine was busy during: " + ", ".join(busy) + "**; numbers measured "
            "then are worse than the system can do."
            if busy
            else "; the machine was quiet."
        ),
        "",
        "## Targets",
        "",
        *markdown_table(["target", "threshold", "measured", "result"], verdicts(results)),
        "",
        "## 1. Throughput: 10,000-line batches, max_tokens 16, beside a direct client",
        "",
        "The target is on `bench/batch-realistic`, a sim engine timed like a GPU engine (50 ms "
        "to first token, 10 ms per token: 200 ms a line, 96 slots): with the same cap of "
        f"{meta['per_runtime_cap']} lines in flight, a direct client can do about "
        f"{meta['per_runtime_cap'] / 0.2:.0f} lines/s, and the question is whether the "
        "orchestrator keeps those slots as full. The second pair runs on `bench/batch-zero`, "
        "which answers at once (0 ms per token, 1024 slots): no engine does, so it has no target; "
        "there the engine's time is nil and the ratio is the orchestrator's CPU per line (upload "
        "parse, validation, chunk messages, admission, Redis writes, output file) against an "
        "aiohttp client's, on the two cores the engine shares.",
        "",
        *markdown_table(
            ["engine", "", "lines", "seconds", "lines/s", "ratio", "details"],
            [
                row
                for name, run_, direct_ in (
                    ("GPU-like (target)", big, direct),
                    ("answers at once (overhead)", results.get("zero_big"),
                     results.get("zero_direct")),
                )
                if run_ is not None
                for row in (
                    [
                        name,
                        "orchestrator (`/v1/batches`, create -> completed)",
                        str(run_["lines"]),
                        f"{run_['seconds']:.2f}",
                        f"{run_['lines_per_s']:.0f}",
                        f"{run_['lines_per_s'] / direct_['lines_per_s']:.0%}",
                        f"request_counts {run_['request_counts']}; CPU (share of a core): "
                        f"batch worker {run_['cpu_util']['batch']:.0%}, web "
                        f"{run_['cpu_util']['web']:.0%}, engines "
                        f"{run_['cpu_util']['engines']:.0%}, redis "
                        f"{run_['cpu_util']['redis']:.0%}; engine requests running mean "
                        f"{num(run_['engine']['running']['mean'])}, batch leases held mean "
                        f"{num(run_['engine']['batch_inflight']['mean'])}",
                    ],
                    [
                        name,
                        f"direct client (aiohttp, {direct_['concurrency']} at a time)",
                        str(direct_["lines"]),
                        f"{direct_['seconds']:.2f}",
                        f"{direct_['lines_per_s']:.0f}",
                        "",
                        f"{direct_['errors']} errors; "
                        f"client used {direct_['client_cpu_util']:.0%} of a core",
                    ],
                )
            ],
        ),
        "",
        "CPU is a share of one core over the batch's wall time, upload included. The batch "
        "worker is one process (gevent): near 100 % it is the bottleneck. Engine requests "
        "running and batch leases held are sampled every 0.2 s (an engine that answers at once "
        "holds a request for well under a millisecond, so its gauge reads about 0).",
        "",
        "## 2. Memory (peak RSS sampled every 0.2 s, upload to completed; GPU-like engine)",
        "",
        *markdown_table(
            [
                "batch",
                "web workers (sum of peaks)",
                "batch worker",
                "total",
                "before the batch (web + batch)",
            ],
            [
                [
                    f"{r['lines']} lines",
                    f"{r['web_peak_mb']:.1f} MB",
                    f"{r['batch_peak_mb']:.1f} MB",
                    f"{r['web_peak_mb'] + r['batch_peak_mb']:.1f} MB",
                    f"{r['web_before_mb']:.1f} + {r['batch_before_mb']:.1f} MB",
                ]
                for r in (small, big, *([results["memory_extra"]]
                                          if "memory_extra" in results else []))
            ],
        ),
        "",
        "The batch worker holds at most 64 chunk messages at once (`-c 64`, 100 lines each), "
        "and runs a chunk's line only once it holds an admission lease: its memory grows until "
        "all 64 are busy (a batch of a few thousand lines) and stays there however long the "
        "batch"
        + (
            f"; the {results['memory_extra']['lines']}-line run shows where it levels off."
            if "memory_extra" in results
            else " (`--memory-lines 30000` shows where it levels off)."
        ),
        "",
        "## 3. Realtime TTFT on `bench/batch-realistic` "
        "(sim, 50 ms to first token, 10 ms per token, 96 slots)",
        "",
        f"{STREAMS} concurrent realtime streams (`bench.stream_client`, max_tokens "
        f"{STREAM_TOKENS}) through the gateway for {rt['alone']['seconds']:g} s alone, then "
        f"again while a {rt['batch_lines']}-line batch (max_tokens {STREAM_TOKENS}) ran on the "
        f"same engine (cancelled afterwards: it ended `{rt['batch_final']}` with "
        f"{rt['batch_done_at_cancel']} lines done).",
        "",
        *markdown_table(
            [
                "",
                "streams",
                "TTFT p50",
                "TTFT p95",
                "TTFT p99",
                "whole stream p50",
                "other load",
                "attempts",
            ],
            [
                [
                    label,
                    str(r["completed"]),
                    f"{r['ttft_p50_ms']:.1f} ms",
                    f"{r['ttft_p95_ms']:.1f} ms",
                    f"{r['ttft_p99_ms']:.1f} ms",
                    f"{r['duration_p50_ms']:.1f} ms",
                    f"{rt['other_load'][key]:.0%}",
                    str(rt.get("attempts", {}).get(key, 1)),
                ]
                for label, key, r in (
                    ("alone", "alone", rt["alone"]),
                    ("with the batch running", "mixed", rt["mixed"]),
                )
            ],
        ),
        "",
        f"While measured with the batch: batch ran {rt['batch_lines_per_s']:.0f} lines/s; "
        f"engine requests running min/mean/max {num(eng['running']['min'])}/"
        f"{num(eng['running']['mean'])}/{num(eng['running']['max'])}, waiting in its queue max "
        f"{num(eng['waiting']['max'])} ({queued} of {eng['samples']} samples non-zero); batch "
        f"cap set by the autoscaler min/max {num(eng['cap']['min'])}/{num(eng['cap']['max'])}; "
        f"batch leases held mean {num(eng['batch_inflight']['mean'])}.",
        "",
        "What this shows: the sim engine does not slow down with load except by queueing (a "
        "request's time is fixed once it has a slot; only when all slots are taken do requests "
        "wait, FIFO). Batch is capped at "
        f"{meta['per_runtime_cap']} lines per engine (less the realtime calls in flight), below "
        "the engine's 96 slots, so "
        + (
            "the engine never queued and the halving of the batch cap was not needed: the cap "
            "alone left room for realtime. What slows realtime here is CPU shared by gateway, "
            "batch worker and engine on this machine."
            if not queued
            else "the engine queued at times; the autoscaler then halves the batch cap "
            "(see the cap min above)."
        ),
        "",
        "## How it was run",
        "",
        "On 127.0.0.1: a private redis, gunicorn (`webapp/gunicorn_conf.py`, 2 gevent workers), "
        "the control worker (`celery -A tasks.worker worker -Q control,downloads -P threads -c 4 "
        "-B`, which starts the sim engines and runs the autoscaler every 1 s), the batch worker "
        "(`celery -A tasks.worker worker -Q batch -P gevent -c 64`), SLEEP_AFTER_SECONDS=0 and "
        f"BATCH_MAX_INFLIGHT_PER_RUNTIME={meta['per_runtime_cap']}. Each engine was warmed by a "
        "realtime call through the gateway (`example-realtime-token`) until 200, and an "
        "unmeasured 200-line batch ran first. Batches are uploaded with `example-upload-token` "
        "and created with `example-batch-token` through the official `openai` SDK; the batch "
        "time runs from `batches.create` to the first `retrieve` (polled every 0.1 s) that "
        "says `completed`, so it includes validation, chunking and writing the output file. "
        "The direct client (`python -m bench.batch --direct-client`, its own process) sends the "
        "same bodies straight to the engine's port, at most "
        f"{meta['per_runtime_cap']} at a time, after opening its connections unmeasured. "
        "Every process shares the machine's cores, so through the orchestrator the engine has "
        "less CPU than when called directly.",
    ]
    return "\n".join(out) + "\n"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's way out, so the stack's teardown runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller batches and shorter runs, to check the harness",
    )
    parser.add_argument(
        "--memory-lines",
        type=int,
        metavar="N",
        help="also measure the memory of an N-line batch (after the 10,000-line one)",
    )
    parser.add_argument("--render", metavar="JSON", help="only re-render the report of a saved run")
    parser.add_argument("--direct-client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=ZERO, help=argparse.SUPPRESS)
    parser.add_argument("--lines", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=PER_RUNTIME, help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct_client:
        result = asyncio.run(
            _direct(args.direct_client, args.model, args.lines, args.concurrency, args.max_tokens)
        )
        json.dump(result, sys.stdout)
        return 0
    if args.render:
        sys.stdout.write(render(json.loads(Path(args.render).read_text())))
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _raise_interrupt)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    import openai

    try:
        results = run(args)
    except (BenchError, openai.OpenAIError) as exc:
        log(f"FAILED: {exc}")
        log(f"process logs: {RESULTS_DIR / 'logs-batch'}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    (RESULTS_DIR / "batch.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    (RESULTS_DIR / "batch.md").write_text(text)
    print(text)
    log(f"report written to {RESULTS_DIR / 'batch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
