"""The sim engine's HTTP application: a stand-in for vLLM's OpenAI-compatible server.

It answers the routes the gateway and the `openai` SDK use (/v1/models, /v1/completions,
/v1/chat/completions, /health, /metrics and vLLM's sleep-mode endpoints) with vLLM's response and
error shapes, simulates time to first token, time per output token and a FIFO scheduler with a
concurrency limit, and can crash mid-request on purpose. Text comes from `textgen`.

The gateway is benchmarked against this server, so the per-request path stays lean: responses are
assembled as strings, metrics are plain counters, and nothing sleeps when the timings are zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from itertools import zip_longest
from json.encoder import encode_basestring_ascii

from aiohttp import web

from runtimes.sim import __version__
from runtimes.sim.textgen import Generation, count_prompt_tokens, generate, render_chat_prompt

CRASH_EXIT_CODE = 3
_DEFAULT_MAX_TOKENS = 16
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE_EVENT = "data: [DONE]\n\n"
_METRICS_HEADERS = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
# vLLM's own bucket edges, so dashboards built for vLLM read the sim the same way.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)


def _compact_json(value: object) -> str:
    # vLLM (pydantic) sends JSON without spaces; fewer bytes on the wire is also what we want.
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything the command line can set; the timings mirror what a real engine spends."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    load_seconds: float = 0.0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    max_concurrency: int = 256
    max_model_len: int = 4096
    crash_after: int = 0
    fail_start: bool = False
    sleep_seconds: float = 0.2
    wake_seconds: float = 0.5
    snapshot_dir: str | None = None


class ApiError(Exception):
    """A request the engine refuses, carrying vLLM's error body fields."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status,
            }
        }
        return web.json_response(body, status=self.status)


def _bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


class SlotScheduler:
    """At most `capacity` requests generate at once; the rest wait in arrival order.

    asyncio.Semaphore does not promise FIFO hand-off on every Python 3.11 patch release, and
    vLLM's scheduler serves waiting requests first-come first-served, so slots are handed over
    explicitly from the releasing request to the oldest waiter.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            return
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                # The slot was handed over just as the waiter gave up: pass it on.
                self.release()
            else:
                self._waiters.remove(slot)
            raise

    def release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot changes hands, so `running` stays the same
                return
        self.running -= 1


class _Histogram:
    __slots__ = ("bounds", "bucket_counts", "count", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.bucket_counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.bucket_counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value


class EngineMetrics:
    """vLLM's Prometheus metrics, kept as plain numbers and rendered only when scraped."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.successes: dict[str, int] = {"stop": 0, "length": 0}
        self.client_disconnects = 0
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)

    def record_success(self, job: GenerationJob, e2e_seconds: float) -> None:
        self.generation_tokens += sum(g.token_count for g in job.generations)
        for generation in job.generations:
            self.successes[generation.finish_reason] += 1
        self.e2e.observe(e2e_seconds)

    def render(self, model_name: str, scheduler: SlotScheduler) -> str:
        label = f'model_name="{_escape_label(model_name)}"'
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution.")
        lines.append(f"vllm:num_requests_running{{{label}}} {float(scheduler.running)}")
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        lines.append(f"vllm:num_requests_waiting{{{label}}} {float(scheduler.waiting)}")
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        lines.append(
            f"vllm:kv_cache_usage_perc{{{label}}} {scheduler.running / scheduler.capacity}"
        )
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        lines.append(f"vllm:prompt_tokens_total{{{label}}} {float(self.prompt_tokens)}")
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        lines.append(f"vllm:generation_tokens_total{{{label}}} {float(self.generation_tokens)}")
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason, count in self.successes.items():
            lines.append(
                f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {float(count)}'
            )
        for name, histogram, help_text in (
            ("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token."),
            ("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency."),
        ):
            family(name, "histogram", help_text)
            cumulative = 0
            for bound, count in zip(
                (*histogram.bounds, "+Inf"), histogram.bucket_counts, strict=True
            ):
                cumulative += count
                lines.append(f'{name}_bucket{{le="{bound}",{label}}} {float(cumulative)}')
            lines.append(f"{name}_count{{{label}}} {float(histogram.count)}")
            lines.append(f"{name}_sum{{{label}}} {histogram.total}")
        family(
            "sim:client_disconnects_total",
            "counter",
            "Requests whose client hung up before the answer was complete.",
        )
        lines.append(f"sim:client_disconnects_total{{{label}}} {float(self.client_disconnects)}")
        return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass(slots=True)
class GenerationJob:
    """A validated request: one generation per prompt, plus how to deliver them."""

    kind: str  # "chat" or "completion"
    generations: list[Generation]
    prompt_tokens: int
    stream: bool
    include_usage: bool

    def usage(self) -> dict[str, int]:
        completion_tokens = sum(g.token_count for g in self.generations)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


class SimEngine:
    """The state one served model shares across requests."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.scheduler = SlotScheduler(config.max_concurrency)
        self.metrics = EngineMetrics()
        self.accepting = True  # false from the start of /sleep until /wake_up has finished
        self.sleeping = False  # what /is_sleeping reports: true once sleep has completed
        self.transition_lock = asyncio.Lock()
        self.requests_admitted = 0
        self.ttft_seconds = config.ttft_ms / 1000.0
        self.tpot_seconds = config.tpot_ms / 1000.0
        self.timed = self.ttft_seconds > 0 or self.tpot_seconds > 0
        self.models_body = _compact_json(
            {
                "object": "list",
                "data": [
                    {
                        "id": config.model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": config.model,
                        "parent": None,
                        "max_model_len": config.max_model_len,
                    }
                ],
            }
        )


ENGINE_KEY = web.AppKey("engine", SimEngine)


# ---------------------------------------------------------------- request validation


def _parse_common(body: dict, config: SimConfig) -> tuple[list[str], bool, bool]:
    model = body.get("model")
    # vLLM falls back to the served model when the field is left out.
    if model is not None and model != config.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get("n") not in (None, 1):
        raise _bad_request("The sim engine only supports n=1.", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad_request("`stream` must be a boolean.", "stream")
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise _bad_request("`stop` must be a string or a list of strings.", "stop")
    return [s for s in stops if s], stream, include_usage


def _max_tokens(body: dict, *fields: str) -> int:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad_request(f"`{field}` must be a positive integer, got {value!r}.", field)
        return value
    return _DEFAULT_MAX_TOKENS


def _check_context(config: SimConfig, prompt_tokens: int, max_tokens: int) -> None:
    requested = prompt_tokens + max_tokens
    if requested > config.max_model_len:
        raise _bad_request(
            f"This model's maximum context length is {config.max_model_len} tokens. However, you "
            f"requested {requested} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )


def _completion_prompts(prompt: object) -> list[tuple[str, int]]:
    """(text, token count) per prompt; token-id prompts are counted by their ids."""
    if isinstance(prompt, str):
        return [(prompt, count_prompt_tokens(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(p, count_prompt_tokens(p)) for p in prompt]
        if all(isinstance(t, int) for t in prompt):
            return [(" ".join(map(str, prompt)), len(prompt))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [(" ".join(map(str, p)), len(p)) for p in prompt]
    raise _bad_request("`prompt` must be a string, a list of strings, or token ids.", "prompt")


def parse_completion_request(body: dict, config: SimConfig) -> GenerationJob:
    stops, stream, include_usage = _parse_common(body, config)
    if "prompt" not in body:
        raise _bad_request("Field required: `prompt`.", "prompt")
    prompts = _completion_prompts(body["prompt"])
    max_tokens = _max_tokens(body, "max_tokens")
    echo = body.get("echo") is True
    generations = []
    for text, prompt_tokens in prompts:
        _check_context(config, prompt_tokens, max_tokens)
        generation = generate(text, max_tokens, stops)
        if echo:
            generation.pieces[0] = text + generation.pieces[0]
        generations.append(generation)
    total_prompt_tokens = sum(count for _, count in prompts)
    return GenerationJob("completion", generations, total_prompt_tokens, stream, include_usage)


def parse_chat_request(body: dict, config: SimConfig) -> GenerationJob:
    stops, stream, include_usage = _parse_common(body, config)
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise _bad_request(
            "`messages` must be a non-empty list of messages with a role.", "messages"
        )
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    prompt_text = render_chat_prompt(messages)
    prompt_tokens = count_prompt_tokens(prompt_text)
    _check_context(config, prompt_tokens, max_tokens)
    generation = generate(prompt_text, max_tokens, stops)
    return GenerationJob("chat", [generation], prompt_tokens, stream, include_usage)


async def _read_json_object(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise _bad_request(f"Invalid JSON body: {error}") from error
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object.")
    return body


# ---------------------------------------------------------------- generation


def _crash(engine: SimEngine, ordinal: int) -> None:
    sys.stderr.write(
        f"sim engine: simulated crash during request {ordinal} (--crash-after "
        f"{engine.config.crash_after})\n"
    )
    sys.stderr.flush()
    # os._exit rather than sys.exit: a real engine crash does not unwind or close sockets nicely.
    os._exit(CRASH_EXIT_CODE)


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


class _ChunkWriter:
    """Renders one request's SSE events; everything but the token text is formatted once."""

    def __init__(self, job: GenerationJob, request_id: str, created: int, model: str):
        self.kind = job.kind
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self.head = (
            f'{{"id":"{request_id}","object":"{obj}","created":{created},'
            f'"model":{encode_basestring_ascii(model)},'
        )
        self.choice_head = "data: " + self.head + '"choices":[{"index":'

    def role(self, index: int) -> str:
        return (
            f'{self.choice_head}{index},"delta":{{"role":"assistant","content":""}},'
            '"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def tokens(self, index: int, generation: Generation) -> list[str]:
        """One event per generated token; the last one carries the finish reason."""
        opening = f"{self.choice_head}{index},"
        opening += '"delta":{"content":' if self.kind == "chat" else '"text":'
        closing = "}," if self.kind == "chat" else ","
        running = closing + '"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
        events = [f"{opening}{encode_basestring_ascii(p)}{running}" for p in generation.pieces]
        finish = _json_or_null(generation.finish_reason)
        stop = _json_or_null(generation.stop_reason)
        events[-1] = (
            f"{opening}{encode_basestring_ascii(generation.pieces[-1])}{closing}"
            f'"logprobs":null,"finish_reason":{finish},"stop_reason":{stop}}}]}}\n\n'
        )
        return events

    def usage(self, usage: dict[str, int]) -> str:
        return f'data: {self.head}"choices":[],"usage":{_compact_json(usage)}}}\n\n'


def _events_per_step(writer: _ChunkWriter, job: GenerationJob) -> list[str]:
    """The SSE text to send at each token step, all choices of that step together."""
    per_choice = [writer.tokens(i, g) for i, g in enumerate(job.generations)]
    if len(per_choice) == 1:
        steps = per_choice[0]
    else:
        steps = ["".join(events) for events in zip_longest(*per_choice, fillvalue="")]
    if job.kind == "chat":
        steps[0] = "".join(writer.role(i) for i in range(len(per_choice))) + steps[0]
    return steps


async def _stream(
    request: web.Request,
    engine: SimEngine,
    job: GenerationJob,
    request_id: str,
    timing: tuple[float, float],
    crash_ordinal: int,
) -> web.StreamResponse:
    arrived, admitted = timing
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(headers=_SSE_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    writer = _ChunkWriter(job, request_id, int(time.time()), engine.config.model)
    steps = _events_per_step(writer, job)
    closing = [writer.usage(job.usage())] if job.include_usage else []
    closing.append(_DONE_EVENT)
    try:
        if engine.timed or crash_ordinal:
            await _send_paced(response, engine, steps, admitted, crash_ordinal)
            engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
        else:
            # Nothing to wait for between tokens: the whole stream goes out in one write.
            closing[:0] = steps
            engine.metrics.ttft.observe(loop.time() - arrived)
        await response.write("".join(closing).encode())
        await response.write_eof()
    except ConnectionResetError:
        engine.metrics.client_disconnects += 1
        return response
    engine.metrics.prompt_tokens += job.prompt_tokens
    engine.metrics.record_success(job, loop.time() - arrived)
    return response


async def _send_paced(
    response: web.StreamResponse,
    engine: SimEngine,
    steps: list[str],
    admitted: float,
    crash_ordinal: int,
) -> None:
    """Send each step's events when its token is due, crashing halfway if asked to."""
    loop = asyncio.get_running_loop()
    crash_step = len(steps) // 2 if crash_ordinal else -1
    # Events that are already due pile up and go out in one write at the next pause.
    pending: list[str] = []
    for step, events in enumerate(steps):
        delay = admitted + engine.ttft_seconds + step * engine.tpot_seconds - loop.time()
        if delay > 0:
            if pending:
                await response.write("".join(pending).encode())
                pending.clear()
            await asyncio.sleep(delay)
        if step == crash_step:
            if pending:
                await response.write("".join(pending).encode())
            _crash(engine, crash_ordinal)
        pending.append(events)
    if pending:
        await response.write("".join(pending).encode())


async def _respond_whole(
    engine: SimEngine,
    job: GenerationJob,
    request_id: str,
    timing: tuple[float, float],
    crash_ordinal: int,
) -> web.Response:
    arrived, admitted = timing
    loop = asyncio.get_running_loop()
    steps = max(g.token_count for g in job.generations)
    busy_seconds = engine.ttft_seconds + (steps - 1) * engine.tpot_seconds
    if crash_ordinal:
        await asyncio.sleep(busy_seconds / 2)
        _crash(engine, crash_ordinal)
    if engine.timed:
        delay = admitted + busy_seconds - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
    engine.metrics.prompt_tokens += job.prompt_tokens
    created = int(time.time())
    if job.kind == "chat":
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": None,
                "finish_reason": g.finish_reason,
                "stop_reason": g.stop_reason,
            }
            for i, g in enumerate(job.generations)
        ]
        obj = "chat.completion"
    else:
        choices = [
            {
                "index": i,
                "text": g.text,
                "logprobs": None,
                "finish_reason": g.finish_reason,
                "stop_reason": g.stop_reason,
            }
            for i, g in enumerate(job.generations)
        ]
        obj = "text_completion"
    body = {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": engine.config.model,
        "choices": choices,
        "usage": job.usage(),
    }
    engine.metrics.record_success(job, loop.time() - arrived)
    return web.Response(body=_compact_json(body).encode(), content_type="application/json")


async def _serve_generation(request: web.Request, kind: str) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    if not engine.accepting:
        return ApiError(
            503, "The engine is sleeping; call /wake_up first.", "ServiceUnavailableError"
        ).response()
    try:
        body = await _read_json_object(request)
        if kind == "chat":
            job = parse_chat_request(body, engine.config)
        else:
            job = parse_completion_request(body, engine.config)
    except ApiError as error:
        return error.response()
    engine.requests_admitted += 1
    ordinal = engine.requests_admitted
    crash_ordinal = ordinal if ordinal == engine.config.crash_after else 0
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    request_id = f"{prefix}{random.getrandbits(128):032x}"
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    try:
        await engine.scheduler.acquire()
    except asyncio.CancelledError:
        engine.metrics.client_disconnects += 1
        raise
    try:
        timing = (arrived, loop.time())
        if job.stream:
            return await _stream(request, engine, job, request_id, timing, crash_ordinal)
        return await _respond_whole(engine, job, request_id, timing, crash_ordinal)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client's connection drops.
        engine.metrics.client_disconnects += 1
        raise
    finally:
        engine.scheduler.release()


# ---------------------------------------------------------------- routes


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _serve_generation(request, "completion")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve_generation(request, "chat")


async def _models(request: web.Request) -> web.Response:
    return web.Response(text=request.app[ENGINE_KEY].models_body, content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    return web.Response()


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": f"sim-{__version__}"})


async def _metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    text = engine.metrics.render(engine.config.model, engine.scheduler)
    return web.Response(body=text.encode(), headers=_METRICS_HEADERS)


async def _sleep(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    level = request.query.get("level", "1")
    if level not in ("1", "2"):
        return _bad_request(f"Sleep level must be 1 or 2, got {level!r}.", "level").response()
    async with engine.transition_lock:
        if not engine.sleeping:
            engine.accepting = False
            try:
                await asyncio.sleep(engine.config.sleep_seconds)  # offloading weights takes time
            except asyncio.CancelledError:
                # The caller hung up before the weights were offloaded: keep serving.
                engine.accepting = True
                raise
            engine.sleeping = True
    return web.Response()


async def _wake_up(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    async with engine.transition_lock:
        if engine.sleeping:
            await asyncio.sleep(engine.config.wake_seconds)  # reloading weights takes a while
            engine.sleeping = False
            engine.accepting = True
    return web.Response()


async def _is_sleeping(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": request.app[ENGINE_KEY].sleeping})


def build_app(config: SimConfig) -> web.Application:
    """The aiohttp application serving `config.model` the way vLLM would."""
    # Long prompts are legitimate; aiohttp's 1 MiB default body limit would reject them.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ENGINE_KEY] = SimEngine(config)
    app.router.add_get("/health", _health)
    app.router.add_get("/version", _version)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/sleep", _sleep)
    app.router.add_post("/wake_up", _wake_up)
    app.router.add_get("/is_sleeping", _is_sleeping)
    return app
