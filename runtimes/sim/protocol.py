"""The sim engine's request side: parsing and validating request bodies the way vLLM does, the
resulting `GenerationJob`, and the errors refused requests get, in vLLM's error shape."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from runtimes.sim.config import SimConfig
from runtimes.sim.structured import SchemaError, structured_generation
from runtimes.sim.textgen import Generation, count_prompt_tokens, generate, render_chat_prompt

_DEFAULT_MAX_TOKENS = 16


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


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


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


def _parse_common(body: dict, config: SimConfig) -> tuple[list[str], bool, bool]:
    model = body.get("model")
    # vLLM falls back to the served model when the field is left out.
    if model is not None and model != config.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get("n") not in (None, 1):
        raise bad_request("The sim engine only supports n=1.", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean.", "stream")
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
        raise bad_request("`stop` must be a string or a list of strings.", "stop")
    return [s for s in stops if s], stream, include_usage


def _max_tokens(body: dict, *fields: str) -> int:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_request(f"`{field}` must be a positive integer, got {value!r}.", field)
        return value
    return _DEFAULT_MAX_TOKENS


def _check_context(config: SimConfig, prompt_tokens: int, max_tokens: int) -> None:
    requested = prompt_tokens + max_tokens
    if requested > config.max_model_len:
        raise bad_request(
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
    raise bad_request("`prompt` must be a string, a list of strings, or token ids.", "prompt")


def parse_completion_request(body: dict, config: SimConfig) -> GenerationJob:
    stops, stream, include_usage = _parse_common(body, config)
    if "prompt" not in body:
        raise bad_request("Field required: `prompt`.", "prompt")
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
        raise bad_request(
            "`messages` must be a non-empty list of messages with a role.", "messages"
        )
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    prompt_text = render_chat_prompt(messages)
    prompt_tokens = count_prompt_tokens(prompt_text)
    _check_context(config, prompt_tokens, max_tokens)
    try:
        generation = structured_generation(body.get("response_format"), prompt_text, max_tokens)
    except SchemaError as exc:
        raise bad_request(str(exc), "response_format") from None
    if generation is None:
        generation = generate(prompt_text, max_tokens, stops)
    return GenerationJob("chat", [generation], prompt_tokens, stream, include_usage)


async def read_json_object(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise bad_request(f"Invalid JSON body: {error}") from error
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body
