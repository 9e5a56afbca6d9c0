"""The sim engine's Responses API, as vLLM 0.32.0 serves it (`POST /v1/responses`,
`GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`).

A call is turned into the chat call vLLM would render it to (`instructions` as a system
message, then the `input` items), so the prompt is counted and the words made up exactly as for
chat, and delivered the same way (`delivery`). The answer is vLLM's response object, every field
it sends; streamed, vLLM's event sequence with its numbering: response.created,
response.in_progress, output_item.added, content_part.added, one output_text.delta per token,
output_text.done, content_part.done, output_item.done, response.completed. A cut by
`max_output_tokens` is status "incomplete" with incomplete_details, as vLLM reports it.

Like vLLM, responses are kept only when the engine's environment has
VLLM_ENABLE_RESPONSES_API_STORE=1; otherwise `store` is ignored, and retrieving or cancelling
any id is a 404. Only a `background` response (which needs the store) can be cancelled; vLLM
calls every other one "synchronous" and refuses.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
from runtimes.sim.fields import (
    ApiError,
    bad_request,
    lax_bool,
    lax_float,
    lax_int,
    validation_error,
)
from runtimes.sim.protocol import GenerationJob, parse_chat_request, read_json_object

if TYPE_CHECKING:
    from runtimes.sim.server import SimEngine

STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"
_NO_STORE_FOR_BACKGROUND = (
    "This vLLM engine does not support `store=True` and therefore does not support the "
    "background mode. To enable these features, set the environment variable "
    "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.")


def store_enabled(environ: Mapping[str, str]) -> bool:
    """vLLM's reading of the variable: an integer, non-zero means on."""
    return bool(int(environ.get(STORE_ENV, "0")))


def new_id(prefix: str) -> str:
    """vLLM's ids: a prefix and 16 hex digits (`resp_...`, `msg_...`)."""
    return f"{prefix}{random.getrandbits(64):016x}"


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.",
                    "invalid_request_error", "response_id")


def renamed_max_tokens(error: ApiError, name: str) -> ApiError:
    """The chat parser's refusal of too large a `max_tokens`, worded for the field the caller
    sent (vLLM names `max_output_tokens` here, `max_completion_tokens` on /v1/messages)."""
    if error.param != "max_tokens" or "cannot be greater than max_model_len" not in error.message:
        return error
    message = error.message.replace("max_tokens=", f"{name}=", 1)
    message = message.replace("(parameter=max_tokens,", f"(parameter={name},")
    return ApiError(error.status, message, error.error_type, name)


@dataclass(slots=True)
class _Stored:
    body: dict
    messages: list[dict]  # the conversation it answered, for a later previous_response_id
    task: asyncio.Task | None = None


@dataclass(slots=True)
class ResponseStore:
    """What vLLM keeps in memory with the store on (and, like vLLM, never forgets)."""

    enabled: bool
    responses: dict[str, _Stored] = field(default_factory=dict)


@dataclass(slots=True)
class _Call:
    job: GenerationJob
    messages: list[dict]
    response_id: str
    store: bool
    background: bool
    fields: dict  # the request's fields the response object echoes


def _input_messages(body: dict) -> list[dict]:
    """The `input` as chat messages: a string is one user message, a list holds items."""
    given = body.get("input")
    if "input" not in body:
        raise validation_error("body.input", "missing", "Field required", body)
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list):
        raise validation_error("body.input", "string_type", "Input should be a valid string",
                               given, ("body.input", "list_type", "Input should be a valid list"))
    messages = []
    for item in given:
        if isinstance(item, dict) and isinstance(item.get("role"), str):
            messages.append({"role": item["role"], "content": item.get("content")})
        elif isinstance(item, dict) and isinstance(item.get("output"), str):
            # A function call's output goes back to the model as a tool message.
            messages.append({"role": "tool", "content": item["output"]})
    return messages


def _parse(body: dict, engine: SimEngine, store: ResponseStore) -> _Call:
    messages = _input_messages(body)
    asked = lax_int(body, "max_output_tokens")
    wants_store = lax_bool(body, "store", True)
    background = lax_bool(body, "background")
    if background and not wants_store:
        raise bad_request("background can only be used when `store` is true "
                          "(parameter=background)", "background")
    model = body.get("model")
    if model is not None and model != engine.config.model:
        raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: "
                       f"{engine.config.model}.", "NotFoundError", "model")
    if background and not store.enabled:
        raise ApiError(400, _NO_STORE_FOR_BACKGROUND, "invalid_request_error", "background")
    previous_id = body.get("previous_response_id")
    if previous_id is not None:
        previous = store.responses.get(previous_id)
        if previous is None:
            raise not_found(previous_id)
        said = "".join(part["text"] for item in previous.body["output"]
                       for part in item["content"])
        messages = [*previous.messages, {"role": "assistant", "content": said}, *messages]
    instructions = body.get("instructions")
    conversation = ([{"role": "system", "content": instructions}] if instructions else [])
    conversation += messages
    chat = {"model": model, "messages": conversation, "max_tokens": asked,
            "stop": body.get("stop"), "priority": body.get("priority"),
            "temperature": body.get("temperature")}
    try:
        job = parse_chat_request(chat, engine.config)
    except ApiError as error:
        raise renamed_max_tokens(error, "max_output_tokens") from None
    room = engine.config.max_model_len - job.prompt_tokens
    fields = {
        "instructions": instructions,
        "metadata": body.get("metadata"),
        "temperature": lax_float(body, "temperature", 1.0),
        "top_p": lax_float(body, "top_p", 1.0),
        "background": background,
        "max_output_tokens": room if asked is None else min(asked, room),
        "previous_response_id": previous_id,
        "user": body.get("user"),
    }
    return _Call(job, messages, new_id("resp_"), wants_store and store.enabled, background,
                 fields)


def _response(call: _Call, model: str, created: int, status: str, output: list,
              usage: dict | None) -> dict:
    """vLLM's response object, field for field and in its order."""
    f = call.fields
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": call.response_id, "created_at": created, "incomplete_details": incomplete,
        "instructions": f["instructions"], "metadata": f["metadata"], "model": model,
        "object": "response", "output": output, "parallel_tool_calls": True,
        "temperature": f["temperature"], "tool_choice": "none", "tools": [],
        "top_p": f["top_p"], "background": f["background"],
        "max_output_tokens": f["max_output_tokens"], "max_tool_calls": None,
        "previous_response_id": f["previous_response_id"], "prompt": None, "reasoning": None,
        "service_tier": "auto", "status": status, "text": None, "top_logprobs": None,
        "truncation": "disabled", "usage": usage, "user": f["user"],
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": None,
        "ec_transfer_params": None, "input_messages": None, "output_messages": None,
    }


def _usage(job: GenerationJob) -> dict:
    output_tokens = job.generations[0].token_count
    return {
        "input_tokens": job.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0,
                                 "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                  "output_tokens_per_turn": [],
                                  "tool_output_tokens_per_turn": []},
        "total_tokens": job.prompt_tokens + output_tokens,
    }


def _text_part(text: str, logprobs: list | None) -> dict:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _message_item(item_id: str, parts: list, status: str) -> dict:
    return {"id": item_id, "content": parts, "role": "assistant", "status": status,
            "type": "message", "phase": None}


def _final(call: _Call, model: str, created: int, item_id: str) -> dict:
    generation = call.job.generations[0]
    # vLLM leaves the content empty when nothing was said (a stop string at once).
    parts = [_text_part(generation.text, None)] if generation.text else []
    status = "incomplete" if generation.finish_reason == "length" else "completed"
    return _response(call, model, created, status, [_message_item(item_id, parts, "completed")],
                     _usage(call.job))


def _event(kind: str, number: int, **fields: object) -> str:
    # vLLM's event JSON lists its fields alphabetically (the SDK's models are written so).
    data = dict(sorted({**fields, "sequence_number": number, "type": kind}.items()))
    return f"event: {kind}\ndata: {compact_json(data)}\n\n"


def _stream_events(call: _Call, final: dict, created: int) -> tuple[list[str], str]:
    """(the events sent at each token step, the events after the last token)."""
    started = _response(call, final["model"], created, "in_progress", [], None)
    opening = [_event("response.created", 0, response=started),
               _event("response.in_progress", 1, response=started)]
    pieces = [p for p in call.job.generations[0].pieces if p]
    if not pieces:  # nothing said: vLLM opens no item at all
        final = {**final, "output": []}
        return [], "".join([*opening, _event("response.completed", 2, response=final)])
    item = final["output"][0]
    where = {"item_id": item["id"], "output_index": 0}
    opening.append(_event("response.output_item.added", 2, output_index=0,
                          item=_message_item(item["id"], [], "in_progress")))
    opening.append(_event("response.content_part.added", 3, content_index=0,
                          part=_text_part("", []), **where))
    steps = [_event("response.output_text.delta", 4 + i, content_index=0, delta=piece,
                    logprobs=[], **where) for i, piece in enumerate(pieces)]
    steps[0] = "".join(opening) + steps[0]
    number = 4 + len(pieces)
    text = "".join(pieces)
    closing = [
        _event("response.output_text.done", number, content_index=0, logprobs=[], text=text,
               **where),
        _event("response.content_part.done", number + 1, content_index=0,
               part=_text_part(text, None), **where),
        _event("response.output_item.done", number + 2, output_index=0, item=item),
        _event("response.completed", number + 3, response=final),
    ]
    return steps, "".join(closing)


class ResponsesRoutes:
    """The three routes, over one engine and its response store."""

    def __init__(self, engine: SimEngine, store: ResponseStore):
        self.engine = engine
        self.store = store

    async def create(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine
        try:
            body = await read_json_object(request)
            call = _parse(body, engine, self.store)
            stream = lax_bool(body, "stream")
        except ApiError as error:
            return error.response()
        created = int(time.time())
        if call.background:
            return self._start_background(call, created)
        crash_ordinal = count_admission(engine)
        arrived = asyncio.get_running_loop().time()
        item_id = new_id("msg_")
        final = _final(call, engine.config.model, created, item_id)
        async with scheduled(engine, call.job.priority) as admitted:
            timing = (arrived, admitted)
            if stream:
                steps, closing = _stream_events(call, final, created)
                response = await open_stream(request)
                try:
                    await stream_steps(response, engine, steps, closing, timing, crash_ordinal)
                except ConnectionResetError:
                    engine.metrics.client_disconnects += 1
                    return response
            else:
                await spend_generation_time(engine, call.job.generations[0].token_count,
                                            admitted, crash_ordinal)
                engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
                response = web.Response(text=compact_json(final),
                                        content_type="application/json")
        self._finish(call, final, arrived)
        return response

    def _finish(self, call: _Call, final: dict, arrived: float) -> None:
        self.engine.metrics.prompt_tokens += call.job.prompt_tokens
        self.engine.metrics.record_success(call.job, asyncio.get_running_loop().time() - arrived)
        if call.store:
            stored = self.store.responses.get(call.response_id)
            if stored is None or stored.body["status"] != "cancelled":
                self.store.responses[call.response_id] = _Stored(final, call.messages)

    def _start_background(self, call: _Call, created: int) -> web.Response:
        queued = _response(call, self.engine.config.model, created, "queued", [], None)
        stored = _Stored(queued, call.messages)
        self.store.responses[call.response_id] = stored
        stored.task = asyncio.get_running_loop().create_task(self._run_background(call, created))
        return web.Response(text=compact_json(queued), content_type="application/json")

    async def _run_background(self, call: _Call, created: int) -> None:
        engine = self.engine
        crash_ordinal = count_admission(engine)
        arrived = asyncio.get_running_loop().time()
        final = _final(call, engine.config.model, created, new_id("msg_"))
        # As in vLLM, a background response reads "queued" until it is done.
        async with scheduled(engine, call.job.priority) as admitted:
            await spend_generation_time(engine, call.job.generations[0].token_count, admitted,
                                        crash_ordinal)
            engine.metrics.ttft.observe(admitted - arrived + engine.ttft_seconds)
        self._finish(call, final, arrived)

    async def retrieve(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        stored = self.store.responses.get(response_id)
        if stored is None:
            return not_found(response_id).response()
        return web.Response(text=compact_json(stored.body), content_type="application/json")

    async def cancel(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        stored = self.store.responses.get(response_id)
        if stored is None:
            return not_found(response_id).response()
        if stored.body["status"] not in ("queued", "in_progress"):
            return ApiError(400, "Cannot cancel a synchronous response.",
                            "invalid_request_error", "response_id").response()
        stored.body = {**stored.body, "status": "cancelled"}
        if stored.task is not None and not stored.task.done():
            stored.task.cancel()
        return web.Response(text=compact_json(stored.body), content_type="application/json")


def register_responses_routes(app: web.Application, engine: SimEngine,
                              environ: Mapping[str, str] = os.environ) -> None:
    """Add the Responses API to `app`; the store is on as vLLM's would be in `environ`."""
    routes = ResponsesRoutes(engine, ResponseStore(store_enabled(environ)))
    app.router.add_post("/v1/responses", routes.create)
    app.router.add_get("/v1/responses/{response_id}", routes.retrieve)
    app.router.add_post("/v1/responses/{response_id}/cancel", routes.cancel)
