"""The sim engine's Anthropic Messages API, as vLLM 0.32.0 serves it (`POST /v1/messages`,
`POST /v1/messages/count_tokens`).

vLLM turns a Messages call into a chat call (`system` first, as a system message) and its answer
back into Anthropic's shapes; the sim does the same, so prompts are counted and words made up as
for chat. Streamed, the events are Anthropic's as vLLM emits them: message_start (with the
input tokens), content_block_start, one content_block_delta per token, content_block_stop,
message_delta (stop_reason, stop_sequence, usage), message_stop; vLLM opens no content block
when nothing is said. `stop_reason` is "max_tokens" for a cut, "stop_sequence" (with
`stop_sequence`) for a stop string.

Errors come in two shapes, as on vLLM: a body its pydantic model refuses (a missing field, a
wrong type, bad JSON) gets vLLM's OpenAI-shaped validation error; whatever the serving code
refuses after that (an unknown model, too many tokens, an empty conversation) is translated
into Anthropic's `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from aiohttp import web

from runtimes.sim.delivery import (
    compact_json,
    count_admission,
    open_stream,
    scheduled,
    spend_generation_time,
    stream_steps,
)
from runtimes.sim.fields import ApiError, lax_bool, lax_int, validation_error
from runtimes.sim.protocol import GenerationJob, parse_chat_request, read_json_object
from runtimes.sim.responses import renamed_max_tokens

if TYPE_CHECKING:
    from runtimes.sim.server import SimEngine

_ROLES = ("user", "assistant", "system")
_VALIDATION = "Bad Request"  # vLLM's error type for what pydantic refuses


class AnthropicError(ApiError):
    """A refusal of the serving code, in Anthropic's error shape (no `param`, no `code`)."""

    def response(self) -> web.Response:
        body = {"type": "error", "error": {"type": self.error_type, "message": self.message}}
        return web.json_response(body, status=self.status)


def _anthropic(error: ApiError) -> ApiError:
    if error.error_type == _VALIDATION:
        return error
    return AnthropicError(error.status, error.message, error.error_type, error.param)


def _check_fields(body: dict, required: tuple[str, ...]) -> list[dict]:
    """What AnthropicMessagesRequest's validation refuses: missing fields, messages that are
    not a list or have a role outside user/assistant/system."""
    missing = [f"body.{name}" for name in required if name not in body]
    if missing:
        raise validation_error(missing[0], "missing", "Field required", body,
                               *((loc, "missing", "Field required") for loc in missing[1:]))
    messages = body["messages"]
    if not isinstance(messages, list):
        raise validation_error("body.messages", "list_type", "Input should be a valid list",
                               messages)
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise validation_error(f"body.messages.{index}.role", "literal_error",
                                   "Input should be 'user', 'assistant' or 'system'", role,
                                   ctx="{'expected': \"'user', 'assistant' or 'system'\"}")
    return messages


def _system_text(system: object) -> str | None:
    if isinstance(system, list):
        return " ".join(b.get("text", "") for b in system if isinstance(b, dict)) or None
    return system if isinstance(system, str) and system else None


def _chat_job(body: dict, engine: SimEngine, max_tokens: int | None) -> GenerationJob:
    messages = _check_fields(body, ("model", "messages") if max_tokens is None
                             else ("model", "messages", "max_tokens"))
    system = _system_text(body.get("system"))
    conversation = ([{"role": "system", "content": system}] if system else []) + messages
    chat = {"model": body["model"], "messages": conversation, "max_tokens": max_tokens or 1,
            "stop": body.get("stop_sequences"), "temperature": body.get("temperature")}
    try:
        return parse_chat_request(chat, engine.config)
    except ApiError as error:
        raise _anthropic(renamed_max_tokens(error, "max_completion_tokens")) from None


def _max_tokens(body: dict) -> int:
    if "max_tokens" not in body:
        _check_fields(body, ("model", "messages", "max_tokens"))
    asked = lax_int(body, "max_tokens")
    if asked is None or asked < 1:
        raise validation_error("body.max_tokens", "value_error",
                               "Value error, max_tokens must be positive", asked,
                               ctx="{'error': ValueError('max_tokens must be positive')}")
    return asked


def _stop(job: GenerationJob) -> tuple[str, str | None]:
    generation = job.generations[0]
    if generation.finish_reason == "length":
        return "max_tokens", None
    if generation.stop_reason is not None:
        return "stop_sequence", generation.stop_reason
    return "end_turn", None


def _message(message_id: str, model: str, job: GenerationJob) -> dict:
    stop_reason, stop_sequence = _stop(job)
    body = {"id": message_id, "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": job.generations[0].text}], "model": model,
            "stop_reason": stop_reason}
    if stop_sequence is not None:  # vLLM leaves out what is None
        body["stop_sequence"] = stop_sequence
    body["usage"] = {"input_tokens": job.prompt_tokens,
                     "output_tokens": job.generations[0].token_count}
    return body


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {compact_json({'type': kind, **data})}\n\n"


def _stream_events(message_id: str, model: str, job: GenerationJob) -> tuple[list[str], str]:
    """(the events sent at each token step, the events after the last token)."""
    start = _sse("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": job.prompt_tokens, "output_tokens": 0}}})
    pieces = [p for p in job.generations[0].pieces if p]
    steps = [_sse("content_block_delta", {"delta": {"type": "text_delta", "text": p},
                                          "index": 0}) for p in pieces]
    closing = []
    if steps:
        block = _sse("content_block_start", {"content_block": {"type": "text", "text": ""},
                                             "index": 0})
        steps[0] = start + block + steps[0]
        closing.append(_sse("content_block_stop", {"index": 0}))
    else:
        closing.append(start)
    stop_reason, stop_sequence = _stop(job)
    closing.append(_sse("message_delta", {
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
        "usage": {"input_tokens": job.prompt_tokens,
                  "output_tokens": job.generations[0].token_count}}))
    closing.append(_sse("message_stop", {}))
    return steps, "".join(closing)


class MessagesRoutes:
    """/v1/messages and /v1/messages/count_tokens over one engine."""

    def __init__(self, engine: SimEngine):
        self.engine = engine

    async def create(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine
        try:
            body = await read_json_object(request)
            job = _chat_job(body, engine, _max_tokens(body))
            stream = lax_bool(body, "stream")
        except ApiError as error:
            return error.response()
        crash_ordinal = count_admission(engine)
        # vLLM answers with the id of the chat completion it made.
        message_id = f"chatcmpl-{random.getrandbits(64):016x}"
        model = engine.config.model
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        async with scheduled(engine, job.priority) as admitted:
            if stream:
                steps, closing = _stream_events(message_id, model, job)
                response = await open_stream(request)
                try:
                    await stream_steps(response, engine, steps, closing, (arrived, admitted),
                                       crash_ordinal)
                except ConnectionResetError:
                    engine.metrics.client_disconnects += 1
                    return response
            else:
                await spend_generation_time(engine, job.generations[0].token_count, admitted,
                                            crash_ordinal)
                engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
                response = web.Response(text=compact_json(_message(message_id, model, job)),
                                        content_type="application/json")
        engine.metrics.prompt_tokens += job.prompt_tokens
        engine.metrics.record_success(job, loop.time() - arrived)
        return response

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = await read_json_object(request)
            job = _chat_job(body, self.engine, None)
        except ApiError as error:
            return error.response()
        count = job.prompt_tokens
        return web.json_response({"input_tokens": count,
                                  "context_management": {"original_input_tokens": count}})


def register_messages_routes(app: web.Application, engine: SimEngine) -> None:
    """Add the Anthropic Messages API to `app`."""
    routes = MessagesRoutes(engine)
    app.router.add_post("/v1/messages", routes.create)
    app.router.add_post("/v1/messages/count_tokens", routes.count_tokens)
