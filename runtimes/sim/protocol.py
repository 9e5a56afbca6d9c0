"""The sim engine's request side: parsing and validating request bodies the way vLLM does, the
resulting `GenerationJob`, and the errors refused requests get, in vLLM's error shape.

Fields are read as vLLM's pydantic models read them (`runtimes.sim.fields`), and the checks after
parsing say what vLLM 0.32.0 says, word for word where a client may read it: limits on `n`,
`max_tokens`, `logprobs`, the context length, tools without a tool parser. Like vLLM, a
`max_tokens` that fits the context alone but not with the prompt is cut to what is left, and a
request without one may fill the whole context.
"""

from __future__ import annotations

import json
from collections.abc import Container
from dataclasses import dataclass

from aiohttp import web

from runtimes.sim.config import SimConfig
from runtimes.sim.fields import (
    ApiError,
    bad_request,
    lax_bool,
    lax_float,
    lax_int,
    validation_error,
)
from runtimes.sim.logprobs import MAX_LOGPROBS
from runtimes.sim.structured import SchemaError, structured_generation
from runtimes.sim.textgen import Generation, count_prompt_tokens, generate, render_chat_prompt

__all__ = ["ApiError", "GenerationJob", "bad_request", "parse_chat_request",
           "parse_completion_request", "read_json_object"]

# Below this temperature vLLM samples greedily, and then n > 1 would give n equal answers.
_GREEDY_TEMPERATURE = 1e-5
_TOOL_PARSER_NEEDED = ('"auto" tool choice requires --enable-auto-tool-choice and '
                       "--tool-call-parser to be set")


@dataclass(slots=True)
class GenerationJob:
    """A validated request: its generations (n per prompt), plus how to deliver them."""

    kind: str  # "chat" or "completion"
    generations: list[Generation]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    priority: int = 0  # vLLM's: lower runs first, under --scheduling-policy priority
    logprobs: int | None = None  # top alternatives per token when asked; None: not asked
    model: str | None = None  # the LoRA adapter asked for, which the answer names; None: base

    def usage(self) -> dict[str, int]:
        completion_tokens = sum(g.token_count for g in self.generations)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


@dataclass(slots=True)
class _Common:
    stops: list[str]
    stream: bool
    include_usage: bool
    n: int
    priority: int
    adapter: str | None


def _parse_common(body: dict, config: SimConfig, adapters: Container[str]) -> _Common:
    model = body.get("model")
    # vLLM falls back to the served model when the field is left out. Its error names the base
    # model only, not the adapters it serves (runtimes.sim.lora).
    adapter = None
    if model is not None and model != config.model:
        if model not in adapters:
            raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: "
                           f"{config.model}.", "NotFoundError", "model")
        adapter = model
    stream = lax_bool(body, "stream")
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
        raise validation_error("body.stop", "string_type", "Input should be a valid string", stop,
                               ("body.stop", "list_type", "Input should be a valid list"))
    n = lax_int(body, "n", 1)
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if n > 1 and lax_float(body, "temperature", 1.0) < _GREEDY_TEMPERATURE:
        raise bad_request(f"n must be 1 when using greedy sampling, got {n}.")
    priority = lax_int(body, "priority", 0)
    return _Common([s for s in stops if s], stream, include_usage, n, priority, adapter)


def _max_tokens(body: dict, config: SimConfig, prompt_tokens: int, *fields: str) -> int:
    """The tokens to generate: as asked, cut to the room the prompt leaves (vLLM does not
    refuse that), or all of that room when not asked."""
    limit = config.max_model_len
    asked = None
    for field in fields:
        asked = lax_int(body, field)
        if asked is not None:
            break
    if asked is not None:
        if asked < 1:
            raise bad_request(f"max_tokens must be at least 1, got {asked}. "
                              f"(parameter=max_tokens, value={asked})", "max_tokens")
        if asked > limit:
            raise bad_request(f"max_tokens={asked} cannot be greater than max_model_len={limit}. "
                              f"Please request fewer output tokens. (parameter=max_tokens, "
                              f"value={asked})", "max_tokens")
    if prompt_tokens >= limit:
        shown = min(prompt_tokens, limit + 1)  # vLLM stops counting one past the limit
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains at least {shown} input tokens, which exceeds this limit even without any "
            f"output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={shown})", "input_tokens")
    room = limit - prompt_tokens
    return room if asked is None else min(asked, room)


def _completion_prompts(prompt: object) -> list[tuple[str, int]]:
    """(text, token count) per prompt; token-id prompts are counted by their ids."""
    if prompt is None or prompt == "":
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty. "
                          "(parameter=prompt)", "prompt")
    if isinstance(prompt, str):
        return [(prompt, count_prompt_tokens(prompt))]
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request("You must pass at least one prompt")
        if all(isinstance(p, str) for p in prompt):
            return [(p, count_prompt_tokens(p)) for p in prompt]
        if all(isinstance(t, int) for t in prompt):
            return [(" ".join(map(str, prompt)), len(prompt))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [(" ".join(map(str, p)), len(p)) for p in prompt]
    raise validation_error("body.prompt", "string_type", "Input should be a valid string", prompt)


def _choice_text(text: str, index: int, adapter: str | None = None) -> str:
    # The first choice reads the prompt itself, so n=1 answers as it always did; each further
    # choice gets a text of its own, as sampling would. An adapter changes the answer, as its
    # weights change vLLM's.
    if adapter is not None:
        text = f"{text}\x00lora {adapter}"
    return text if index == 0 else f"{text}\x00choice {index}"


def _logprobs_limit(top: int | None) -> int | None:
    if top is not None and top > MAX_LOGPROBS:
        raise bad_request(f"Requested sample logprobs of {top}, which is greater than max "
                          f"allowed: {MAX_LOGPROBS} (parameter=logprobs, value={top})",
                          "logprobs")
    return None if top is None else max(0, top)


def parse_completion_request(body: dict, config: SimConfig,
                             adapters: Container[str] = ()) -> GenerationJob:
    common = _parse_common(body, config, adapters)
    prompts = _completion_prompts(body.get("prompt"))
    logprobs = _logprobs_limit(lax_int(body, "logprobs"))
    echo = body.get("echo") is True
    generations = []
    for text, prompt_tokens in prompts:
        max_tokens = _max_tokens(body, config, prompt_tokens, "max_tokens")
        for index in range(common.n):
            generation = generate(_choice_text(text, index, common.adapter), max_tokens,
                                  common.stops)
            if echo:
                generation.pieces[0] = text + generation.pieces[0]
            generations.append(generation)
    total_prompt_tokens = sum(count for _, count in prompts)
    return GenerationJob("completion", generations, total_prompt_tokens, common.stream,
                         common.include_usage, common.priority, logprobs, common.adapter)


def _check_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise validation_error("body.messages", "missing", "Field required", body)
    if not isinstance(messages, list):
        raise validation_error("body.messages", "list_type", "Input should be a valid list",
                               messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise validation_error(f"body.messages.{index}.role", "missing", "Field required",
                                   message)
    if not messages:
        raise bad_request("Cannot apply chat template to an empty conversation. Provide at least "
                          "one message.")
    return messages


def parse_chat_request(body: dict, config: SimConfig,
                       adapters: Container[str] = ()) -> GenerationJob:
    messages = _check_messages(body)
    common = _parse_common(body, config, adapters)
    wants_logprobs = lax_bool(body, "logprobs")
    top = lax_int(body, "top_logprobs")
    if top is not None and not wants_logprobs:
        raise bad_request("when using `top_logprobs`, `logprobs` must be set to true. "
                          "(parameter=top_logprobs)", "top_logprobs")
    logprobs = _logprobs_limit(top or 0) if wants_logprobs else None
    if body.get("tools") and body.get("tool_choice") in (None, "auto"):
        # vLLM answers tool calls only when started with a tool parser.
        raise bad_request(_TOOL_PARSER_NEEDED)
    prompt_text = render_chat_prompt(messages)
    prompt_tokens = count_prompt_tokens(prompt_text)
    max_tokens = _max_tokens(body, config, prompt_tokens, "max_completion_tokens", "max_tokens")
    generations = []
    for index in range(common.n):
        text = _choice_text(prompt_text, index, common.adapter)
        try:
            generation = structured_generation(body.get("response_format"), text, max_tokens)
        except SchemaError as exc:
            raise bad_request(f"Grammar error: {exc}") from None
        generations.append(generation or generate(text, max_tokens, common.stops))
    return GenerationJob("chat", generations, prompt_tokens, common.stream,
                         common.include_usage, common.priority, logprobs, common.adapter)


async def read_json_object(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise validation_error("body", "json_invalid", "JSON decode error", str(error)) from None
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid "
                               "dictionary or object to extract fields from", body)
    return body
