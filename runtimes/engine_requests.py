"""Marshmallow schemas of the engine request bodies the gateway checks before sending them.

The gateway checks what it must understand (the model, token bounds, the stream flag, the shape
of prompts and messages); every other OpenAI or engine-specific field passes through untouched
(`unknown = INCLUDE`), since the engine is the authority on its own sampling parameters. The
realtime API (webapp.realtime) and a batch's validation (jobs.lifecycle) use the same schemas.
"""

from __future__ import annotations

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate, validates_schema

from runtimes.catalog import EMBEDDING, GENERATE

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


def check_embedding_input(value) -> None:
    try:
        check_prompt(value)
    except ValidationError:
        raise ValidationError(
            "must be a string, a list of strings or a list of token ids") from None


def check_response_input(value) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return
    raise ValidationError("must be a string or a non-empty list of input items")


def check_anthropic_messages(value) -> None:
    check_messages(value)
    for index, message in enumerate(value):
        if not isinstance(message.get("content"), str | list):
            raise ValidationError(f"message {index} must have a 'content' string or list")


def check_system(value) -> None:
    if isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(v, dict) for v in value)):
        return
    raise ValidationError("must be a string or a list of text blocks")


def check_texts(value) -> None:
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(v, str) for v in value)):
        return
    raise ValidationError("must be a string or a non-empty list of strings")


def _tokens(**kw) -> fields.Integer:
    return fields.Integer(allow_none=True, validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT),
                          strict=True, **kw)


class ModelRequest(Schema):
    """The part every engine call shares: the model, which picks the engine."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(required=True, validate=validate.Length(min=1, max=256))


class EmbeddingRequest(ModelRequest):
    input = fields.Raw(required=True, validate=check_embedding_input)
    encoding_format = fields.String(allow_none=True, validate=validate.OneOf(("float", "base64")))
    dimensions = _tokens()


class ResponseRequest(ModelRequest):
    input = fields.Raw(required=True, validate=check_response_input)
    instructions = fields.String(allow_none=True)
    max_output_tokens = _tokens()
    stream = fields.Boolean(allow_none=True, truthy={True}, falsy={False})
    store = fields.Boolean(allow_none=True, truthy={True}, falsy={False})
    background = fields.Boolean(allow_none=True, truthy={True}, falsy={False})
    previous_response_id = fields.String(allow_none=True, validate=validate.Length(max=256))
    temperature = fields.Float(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1))


class MessagesRequest(ModelRequest):
    """Anthropic's Messages API, as vLLM serves it: max_tokens is required there."""

    messages = fields.Raw(required=True, validate=check_anthropic_messages)
    max_tokens = _tokens(required=True)
    system = fields.Raw(allow_none=True, validate=check_system)
    stream = fields.Boolean(allow_none=True, truthy={True}, falsy={False})
    temperature = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1))
    top_p = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1))
    top_k = fields.Integer(allow_none=True, validate=validate.Range(min=0), strict=True)
    stop_sequences = fields.List(fields.String(), allow_none=True)


class CountTokensRequest(ModelRequest):
    messages = fields.Raw(required=True, validate=check_anthropic_messages)
    system = fields.Raw(allow_none=True, validate=check_system)


class TokenizeRequest(ModelRequest):
    """vLLM's /tokenize: a prompt, or chat messages (then rendered by the chat template)."""

    prompt = fields.String(allow_none=True)
    messages = fields.Raw(allow_none=True, validate=check_messages)
    add_special_tokens = fields.Boolean(allow_none=True, truthy={True}, falsy={False})
    return_token_strs = fields.Boolean(allow_none=True, truthy={True}, falsy={False})

    @validates_schema
    def _one_of(self, data, **kwargs):
        if (data.get("prompt") is None) == (data.get("messages") is None):
            raise ValidationError("give one of 'prompt' or 'messages'", field_name="prompt")


class DetokenizeRequest(ModelRequest):
    tokens = fields.List(fields.Integer(strict=True, validate=validate.Range(min=0)),
                         required=True)


class RerankRequest(ModelRequest):
    query = fields.String(required=True)
    documents = fields.Raw(required=True, validate=check_texts)
    top_n = fields.Integer(allow_none=True, validate=validate.Range(min=0), strict=True)


class ScoreRequest(ModelRequest):
    text_1 = fields.Raw(required=True, validate=check_texts)
    text_2 = fields.Raw(required=True, validate=check_texts)


COMPLETION = CompletionRequest()
CHAT_COMPLETION = ChatCompletionRequest()
EMBEDDINGS = EmbeddingRequest()
RESPONSE = ResponseRequest()
MESSAGES = MessagesRequest()
COUNT_TOKENS = CountTokensRequest()
TOKENIZE = TokenizeRequest()
DETOKENIZE = DetokenizeRequest()
RERANK = RerankRequest()
SCORE = ScoreRequest()
# What a batch line may ask for (OpenAI's Batch API allows these urls), with the model kind each
# endpoint needs.
SCHEMA_BY_ENDPOINT = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT_COMPLETION,
                      "/v1/embeddings": EMBEDDINGS, "/v1/responses": RESPONSE}
KIND_BY_ENDPOINT = {"/v1/completions": GENERATE, "/v1/chat/completions": GENERATE,
                    "/v1/embeddings": EMBEDDING, "/v1/responses": GENERATE}


def check_engine_body(endpoint: str, body: dict) -> None:
    """Raise ValueError naming the first bad field of a request body for `endpoint`."""
    errors = SCHEMA_BY_ENDPOINT[endpoint].validate(body)
    if errors:
        field, messages = next(iter(sorted(errors.items())))
        raise ValueError(f"'{field}': {messages[0] if isinstance(messages, list) else messages}")
