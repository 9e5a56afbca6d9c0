"""Command line of the sim engine: `python -m runtimes.sim --model NAME --port PORT [...]`.

Handles what happens around serving, the way vLLM's launcher does: refusing to start without
weights, a loading phase during which the port stays closed (so "the port answers" means
"ready"), a simulated start failure, and a prompt, clean exit on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from runtimes.sim.config import SimConfig
from runtimes.sim.lora import add_lora_arguments, lora_options
from runtimes.sim.scheduler import POLICIES
from runtimes.sim.server import build_app
from runtimes.storage import RepoCache

START_FAILURE_EXIT_CODE = 2
RUNNERS = ("auto", "generate", "pooling")  # vLLM's "draft" runner serves nothing here
# aiohttp waits this long for in-flight requests on shutdown; SIGTERM must end the process in 1 s.
_SHUTDOWN_GRACE_SECONDS = 0.3


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> SimConfig:
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.sim",
        description="Simulated vLLM OpenAI-compatible server (no GPU, no model).",
    )
    parser.add_argument(
        "--model", required=True, help="served model name (vLLM's --served-model-name)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        required=True,
        type=_non_negative_int,
        help="0 picks a free port, reported in the ready line",
    )
    parser.add_argument(
        "--load-seconds",
        type=_non_negative_float,
        default=0.0,
        help="simulated weight loading before the port is bound",
    )
    parser.add_argument(
        "--ttft-ms", type=_non_negative_float, default=0.0, help="time to first token"
    )
    parser.add_argument(
        "--tpot-ms",
        type=_non_negative_float,
        default=0.0,
        help="time per output token after the first",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=256,
        help="requests generating at once; more wait in a FIFO queue",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=4096,
        help="prompt tokens + max_tokens allowed per request",
    )
    parser.add_argument(
        "--crash-after",
        type=_non_negative_int,
        default=0,
        help="exit with code 3 halfway through the Nth request (0: never)",
    )
    parser.add_argument(
        "--fail-start",
        action="store_true",
        help="exit with code 2 after loading instead of serving",
    )
    parser.add_argument(
        "--sleep-seconds", type=_non_negative_float, default=0.2, help="time /sleep takes"
    )
    parser.add_argument(
        "--wake-seconds", type=_non_negative_float, default=0.5, help="time /wake_up takes"
    )
    parser.add_argument(
        "--snapshot-dir",
        default=None,
        help="model snapshot that must hold config.json and *.safetensors",
    )
    parser.add_argument(
        "--hf-repo",
        default=None,
        help="load the snapshot of this repo from the HF cache at $HF_HOME, as vLLM does offline",
    )
    parser.add_argument("--revision", default=None, help="with --hf-repo: branch, tag or commit")
    parser.add_argument(
        "--scheduling-policy",
        choices=POLICIES,
        default="fcfs",
        help="vLLM's: the order waiting requests start in (priority: lowest `priority` first)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=_non_negative_float,
        default=None,
        help="accepted as vLLM's (the share of each GPU placement gave it); the sim holds none",
    )
    add_lora_arguments(parser)
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default="generate",
        help="vLLM's: generate serves completions and chat; pooling serves embeddings, score, "
        "rerank (auto: generate, as vLLM picks for a generative model)",
    )
    parser.add_argument(
        "--convert",
        choices=("auto", "embed", "none"),
        default="auto",
        help="vLLM's: with --runner pooling, auto and embed both mean embed",
    )
    parser.add_argument(
        "--hidden-size", type=_positive_int, default=64, help="length of the embeddings"
    )
    parser.add_argument("--api-key", default=None,
                        help="vLLM's: the /v1 routes answer 401 without this bearer token")
    args = parser.parse_args(argv)
    if args.runner == "pooling" and args.convert == "none":
        # vLLM's refusal (it then exits 1), for a generative model without its embed adapter.
        parser.error("This model does not support `--runner pooling`. You can pass `--convert "
                     "<embed|classify> to adapt it into a pooling model.")
    return SimConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        load_seconds=args.load_seconds,
        ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms,
        max_concurrency=args.max_concurrency,
        max_model_len=args.max_model_len,
        crash_after=args.crash_after,
        fail_start=args.fail_start,
        sleep_seconds=args.sleep_seconds,
        wake_seconds=args.wake_seconds,
        snapshot_dir=args.snapshot_dir or _cached_snapshot(args.hf_repo, args.revision),
        scheduling_policy=args.scheduling_policy,
        root=args.hf_repo,
        lora=lora_options(args),
        runner="pooling" if args.runner == "pooling" else "generate",
        hidden_size=args.hidden_size,
        api_key=args.api_key,
    )


def _cached_snapshot(repo_id: str | None, revision: str | None) -> str | None:
    if repo_id is None:
        return None
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return str(RepoCache(Path(hf_home), repo_id).snapshot_dir(revision))


def snapshot_problem(snapshot_dir: str) -> str | None:
    """Why vLLM would refuse to load this snapshot, or None if it looks loadable."""
    directory = Path(snapshot_dir)
    if not directory.is_dir():
        return f"snapshot directory {snapshot_dir} does not exist"
    if not (directory / "config.json").is_file():
        return f"no config.json in snapshot directory {snapshot_dir}"
    if not any(directory.glob("*.safetensors")):
        return f"no *.safetensors weight files in snapshot directory {snapshot_dir}"
    return None


def _fail(message: str) -> int:
    print(f"sim engine: error: {message}", file=sys.stderr, flush=True)
    return START_FAILURE_EXIT_CODE


async def _serve(config: SimConfig) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)

    if config.load_seconds > 0:
        # Waiting on the stop event rather than sleeping lets SIGTERM end the load promptly.
        try:
            await asyncio.wait_for(stop_requested.wait(), timeout=config.load_seconds)
            return 0
        except TimeoutError:
            pass
    if config.fail_start:
        return _fail(
            f"simulated start failure (--fail-start): CUDA out of memory while loading "
            f"the weights of {config.model}"
        )

    runner = web.AppRunner(
        build_app(config),
        handle_signals=False,
        access_log=None,
        # Cancelling the handler when a client hangs up is what frees its slot promptly.
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        print(
            f"sim engine: error: cannot listen on {config.host}:{config.port}: {error}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    port = runner.addresses[0][1]
    print(f"sim engine ready: model={config.model} port={port}", file=sys.stderr, flush=True)
    await stop_requested.wait()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config.snapshot_dir is not None:
        problem = snapshot_problem(config.snapshot_dir)
        if problem is not None:
            return _fail(problem)
    return asyncio.run(_serve(config))


if __name__ == "__main__":
    sys.exit(main())
