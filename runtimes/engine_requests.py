"""Marshmallow schemas of the engine request bodies the gateway checks before sending them.

The gateway checks what it must understand (the model, token bounds, the stream flag, the shape
of prompts and messages); every other OpenAI or engine-specific field passes through untouched
(`unknown = INCLUDE`), since the engine is the authority on its own sampling parameters. The
realtime API (webapp.realtime) and a batch's validation (jobs.lifecycle) use the same schemas.
"""

from __future__ import annotations

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

MAX_TOKENS_LIMIT = 1_000_000


def check_prompt(value) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return
    raise ValidationError("must be a string, a list of strings or a list of token ids")


def check_messages(value) -> None:
    if not isinstance(value, list) or not value:
        raise ValidationError("must be a non-empty list of messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValidationError(f"message {index} must be an object with a 'role'")


class SamplingRequest(Schema):
    class Meta:
        unknown = INCLUDE

    model = fields.String(required=True, validate=validate.Length(min=1, max=256))
    max_tokens = fields.Integer(
        allow_none=True, validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT), strict=True
    )
    stream = fields.Boolean(allow_none=True, truthy={True}, falsy={False})
    n = fields.Integer(allow_none=True, validate=validate.Range(min=1, max=128), strict=True)
    temperature = fields.Float(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1))
    stream_options = fields.Dict(allow_none=True)


class CompletionRequest(SamplingRequest):
    prompt = fields.Raw(required=True, validate=check_prompt)


class ChatCompletionRequest(SamplingRequest):
    messages = fields.Raw(required=True, validate=check_messages)
    max_completion_tokens = fields.Integer(
        allow_none=True, validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT), strict=True
    )


COMPLETION = CompletionRequest()
CHAT_COMPLETION = ChatCompletionRequest()
SCHEMA_BY_ENDPOINT = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT_COMPLETION}


def check_engine_body(endpoint: str, body: dict) -> None:
    """Raise ValueError naming the first bad field of a request body for `endpoint`."""
    errors = SCHEMA_BY_ENDPOINT[endpoint].validate(body)
    if errors:
        field, messages = next(iter(sorted(errors.items())))
        raise ValueError(f"'{field}': {messages[0] if isinstance(messages, list) else messages}")
