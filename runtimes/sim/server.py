"""The sim engine's HTTP application: a stand-in for vLLM's OpenAI-compatible server.

It answers the routes the gateway and the `openai` SDK use (/v1/models, /v1/completions,
/v1/chat/completions, /health, /metrics and vLLM's sleep-mode endpoints; the Responses API and
the Anthropic Messages API are in `responses` and `messages`) with vLLM's response and error
shapes, simulates time to first token and time per output token, and can crash mid-request
on purpose. Requests are parsed in `protocol`, queued by `scheduler`, counted in `metrics`; text
comes from `textgen`; admission and pacing, shared by every API, are in `delivery`.

The gateway is benchmarked against this server, so the per-request path stays lean: responses are
assembled as strings, metrics are plain counters, and nothing sleeps when the timings are zero.
"""

from __future__ import annotations

import asyncio
import random
import time
from itertools import zip_longest
from json.encoder import encode_basestring_ascii

from aiohttp import web

from runtimes.sim import __version__
from runtimes.sim.config import SimConfig
from runtimes.sim.delivery import (
    CRASH_EXIT_CODE,
    compact_json,
    count_admission,
    open_stream,
    scheduled,
    spend_generation_time,
    stream_steps,
)
from runtimes.sim.fields import validation_error
from runtimes.sim.logprobs import chat_logprobs, completion_logprobs
from runtimes.sim.lora import register_lora_routes, served_adapters
from runtimes.sim.messages import register_messages_routes
from runtimes.sim.metrics import METRICS_HEADERS, EngineMetrics
from runtimes.sim.pooling import register_pooling_routes
from runtimes.sim.protocol import (
    ApiError,
    GenerationJob,
    parse_chat_request,
    parse_completion_request,
    read_json_object,
)
from runtimes.sim.responses import register_responses_routes
from runtimes.sim.scheduler import SlotScheduler
from runtimes.sim.textgen import Generation, seed_for

__all__ = ["CRASH_EXIT_CODE", "ENGINE_KEY", "SimEngine", "build_app"]
_DONE_EVENT = "data: [DONE]\n\n"


class SimEngine:
    """The state one served model shares across requests."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.scheduler = SlotScheduler(config.max_concurrency, config.scheduling_policy)
        self.metrics = EngineMetrics()
        # Cleared from the start of /sleep until /wake_up has finished. Requests that arrive
        # meanwhile wait for it, as vLLM holds them (it neither refuses nor queues them).
        self.awake = asyncio.Event()
        self.awake.set()
        self.sleeping = False  # what /is_sleeping reports: true once sleep has completed
        self.sleep_level = 0  # 0 awake; 1 weights offloaded; 2 weights discarded
        self.transition_lock = asyncio.Lock()
        self.requests_admitted = 0
        self.ttft_seconds = config.ttft_ms / 1000.0
        self.tpot_seconds = config.tpot_ms / 1000.0
        self.timed = self.ttft_seconds > 0 or self.tpot_seconds > 0
        self.models_body = compact_json(
            {
                "object": "list",
                "data": [
                    {
                        "id": config.model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": config.root or config.model,
                        "parent": None,
                        "max_model_len": config.max_model_len,
                    }
                ],
            }
        )


ENGINE_KEY = web.AppKey("engine", SimEngine)


# ---------------------------------------------------------------- generation


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
        return f'data: {self.head}"choices":[],"usage":{compact_json(usage)}}}\n\n'


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
    arrived = timing[0]
    loop = asyncio.get_running_loop()
    response = await open_stream(request)
    writer = _ChunkWriter(job, request_id, int(time.time()), job.model or engine.config.model)
    steps = _events_per_step(writer, job)
    closing = [writer.usage(job.usage())] if job.include_usage else []
    closing.append(_DONE_EVENT)
    try:
        await stream_steps(response, engine, steps, "".join(closing), timing, crash_ordinal)
    except ConnectionResetError:
        engine.metrics.client_disconnects += 1
        return response
    engine.metrics.prompt_tokens += job.prompt_tokens
    engine.metrics.record_success(job, loop.time() - arrived)
    return response


def _logprobs(job: GenerationJob, generation: Generation, index: int) -> dict | None:
    if job.logprobs is None:
        return None
    seed = seed_for(generation.text) + index
    if job.kind == "chat":
        return chat_logprobs(generation, job.logprobs, seed)
    return completion_logprobs(generation, job.logprobs, seed)


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
    await spend_generation_time(engine, steps, admitted, crash_ordinal)
    engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
    engine.metrics.prompt_tokens += job.prompt_tokens
    created = int(time.time())
    if job.kind == "chat":
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": _logprobs(job, g, i),
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
                "logprobs": _logprobs(job, g, i),
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
        "model": job.model or engine.config.model,
        "choices": choices,
        "usage": job.usage(),
    }
    engine.metrics.record_success(job, loop.time() - arrived)
    return web.Response(body=compact_json(body).encode(), content_type="application/json")


async def _serve_generation(request: web.Request, kind: str) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    try:
        body = await read_json_object(request)
        adapters = served_adapters(request.app)
        if kind == "chat":
            job = parse_chat_request(body, engine.config, adapters)
        else:
            job = parse_completion_request(body, engine.config, adapters)
    except ApiError as error:
        return error.response()
    crash_ordinal = count_admission(engine)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    request_id = f"{prefix}{random.getrandbits(128):032x}"
    arrived = asyncio.get_running_loop().time()
    async with scheduled(engine, job.priority) as admitted:
        timing = (arrived, admitted)
        if job.stream:
            return await _stream(request, engine, job, request_id, timing, crash_ordinal)
        return await _respond_whole(engine, job, request_id, timing, crash_ordinal)


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
    text = engine.metrics.render(engine.config.model, engine.scheduler, engine.sleep_level)
    return web.Response(body=text.encode(), headers=METRICS_HEADERS)


def _sleep_level(request: web.Request) -> int:
    """`?level=` as vLLM's query model reads it: an integer, 1 or 2 (default 1)."""
    raw = request.query.get("level", "1")
    try:
        level = int(raw)
    except ValueError:
        raise validation_error("query.level", "int_parsing", "Input should be a valid integer, "
                               "unable to parse string as an integer", raw) from None
    if level > 2:
        raise validation_error("query.level", "less_than_equal",
                               "Input should be less than or equal to 2", raw)
    if level < 1:
        raise validation_error("query.level", "greater_than_equal",
                               "Input should be greater than or equal to 1", raw)
    return level


async def _sleep(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        level = _sleep_level(request)
    except ApiError as error:
        return error.response()
    async with engine.transition_lock:
        if not engine.sleeping:
            engine.awake.clear()
            try:
                await asyncio.sleep(engine.config.sleep_seconds)  # offloading weights takes time
            except asyncio.CancelledError:
                # The caller hung up before the weights were offloaded: keep serving.
                engine.awake.set()
                raise
            engine.sleeping = True
            engine.sleep_level = level
    return web.json_response({"status": "sleeping", "level": engine.sleep_level})


async def _wake_up(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    async with engine.transition_lock:
        if engine.sleeping:
            await asyncio.sleep(engine.config.wake_seconds)  # reloading weights takes a while
            engine.sleeping = False
            engine.sleep_level = 0
            engine.awake.set()
    return web.json_response({"status": "awake", "tags": None})


async def _is_sleeping(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": request.app[ENGINE_KEY].sleeping})


def _requires_key(api_key: str):
    """vLLM's `--api-key`: a /v1 route answers 401 `{"error": "Unauthorized"}` without it."""
    expected = f"Bearer {api_key}"

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path.startswith("/v1") and request.headers.get("Authorization") != expected:
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check


def build_app(config: SimConfig) -> web.Application:
    """The aiohttp application serving `config.model` the way vLLM would."""
    # Long prompts are legitimate; aiohttp's 1 MiB default body limit would reject them.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ENGINE_KEY] = engine = SimEngine(config)
    if config.api_key:
        app.middlewares.append(_requires_key(config.api_key))
    app.router.add_get("/health", _health)
    app.router.add_get("/version", _version)
    app.router.add_get("/v1/models", _models)
    if config.runner == "generate":  # a pooling runner serves no generation route (vLLM's 404)
        app.router.add_post("/v1/completions", _completions)
        app.router.add_post("/v1/chat/completions", _chat_completions)
        register_responses_routes(app, engine)
        register_messages_routes(app, engine)
    register_pooling_routes(app, config)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/sleep", _sleep)
    app.router.add_post("/wake_up", _wake_up)
    app.router.add_get("/is_sleeping", _is_sleeping)
    register_lora_routes(app, engine)
    return app
