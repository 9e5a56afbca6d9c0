"""The request side of the sim's pooling and tokenizer routes: bodies read as vLLM 0.32.0 reads
them, and its refusals, in its words (measured on the CPU build serving the tiny model).

vLLM parses these bodies with unions of pydantic models (four shapes of `/v1/embeddings` body,
four of `/score`, two of `/tokenize`), so a bad field is reported once per member of the union:
"7 validation errors" for an embeddings body without `input`. Where the list is short and fixed
(a missing field, a scalar where a list belongs) the sim writes it whole; elsewhere its list
starts with vLLM's first error (same `param`, same first line) and may be shorter. Checks made
after parsing (the model, empty or over-long prompts, the score pairing) are `BadRequestError`s,
word for word.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtimes.sim.config import SimConfig
from runtimes.sim.fields import ApiError, _shown, bad_request, lax_bool, lax_int
from runtimes.sim.textgen import render_chat_prompt
from runtimes.sim.tokenizer import SimTokenizer

ENCODING_FORMATS = ("float", "base64", "bytes", "bytes_only")
EMBED_DTYPES = ("float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2")
ENDIANNESS = ("native", "big", "little")
_SHOWN_ERRORS = 10  # pydantic's message lists this many, then "...and N more errors"
_SCORE_FIELDS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
                 ("text_1", "text_2"))


def pydantic_errors(errors: list[tuple]) -> ApiError:
    """Validation errors as vLLM words them; each error is (loc, type, msg, input[, ctx])."""
    lines = []
    for loc, kind, msg, value, *ctx in errors[:_SHOWN_ERRORS]:
        entry = {"type": kind, "loc": loc, "msg": msg, "input": _shown(value)}
        if ctx:
            entry["ctx"] = ctx[0]
        lines.append(f"  {entry!r}")
    if len(errors) > _SHOWN_ERRORS:
        lines.append(f"  ...and {len(errors) - _SHOWN_ERRORS} more errors")
    count = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''}"
    return ApiError(400, "\n".join([f"{count}:", *lines]), "Bad Request", errors[0][0])


def _literal(body: dict, field: str, choices: tuple[str, ...]) -> str:
    value = body.get(field, choices[0])
    if value in choices:
        return value
    quoted = [f"'{c}'" for c in choices]
    expected = f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise pydantic_errors([(f"body.{field}", "literal_error", f"Input should be {expected}",
                            value, {"expected": expected})])


def _check_pooling_model(body: dict, config: SimConfig) -> None:
    # The pooling routes word an unknown model without the list of valid names (and no param),
    # unlike the generation and tokenizer routes.
    model = body.get("model")
    if model is not None and model != config.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")


def check_served_model(body: dict, config: SimConfig) -> None:
    model = body.get("model")
    if model is not None and model != config.model:
        raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: "
                       f"{config.model}.", "NotFoundError", "model")


def _too_long(count: int, limit: int) -> ApiError:
    shown = min(count, limit + 1)  # vLLM stops counting one past the limit
    return bad_request(
        f"This model's maximum context length is {limit} tokens. However, your prompt contains "
        f"at least {shown} input tokens, which exceeds this limit even without any output "
        f"tokens. Please reduce the length of the input prompt. (parameter=input_tokens, "
        f"value={shown})", "input_tokens")


def _is_message_list(value: object) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value))


# ---------------------------------------------------------------- embeddings


@dataclass(slots=True)
class EmbeddingRequest:
    prompts: list[list[int]]  # token ids, one list per input
    encoding_format: str
    embed_dtype: str
    endianness: str


def _input_type_error(value: object) -> ApiError:
    """The first of vLLM's errors for an `input` of no accepted shape: its first member of the
    union is `list[int]`, so the first error is about the value, or its first non-integer."""
    if not isinstance(value, list):
        return pydantic_errors([("body.input", "list_type", "Input should be a valid list",
                                 value)])
    for index, item in enumerate(value):
        loc = f"body.input.{index}"
        if isinstance(item, str):
            return pydantic_errors([(loc, "int_parsing", "Input should be a valid integer, "
                                     "unable to parse string as an integer", item)])
        if not isinstance(item, int) or isinstance(item, bool):
            return pydantic_errors([(loc, "int_type", "Input should be a valid integer", item)])
    raise AssertionError("unreachable: a list of integers is a valid input")


def _embedding_prompts(body: dict, tokenizer: SimTokenizer) -> list[list[int]]:
    value = body.get("input")
    if _is_message_list(value):  # the chat form, given in `input`
        return [tokenizer.encode(render_chat_prompt(value))]
    if "input" in body:
        if isinstance(value, str):
            return [tokenizer.encode(value)]
        if isinstance(value, list):
            if not value:
                raise bad_request("You must pass at least one prompt")
            if all(isinstance(v, str) for v in value):
                return [tokenizer.encode(v) for v in value]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return [list(value)]
            if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
                return [list(v) for v in value]
        raise _input_type_error(value)
    messages = body.get("messages")
    if messages is None:
        missing = ("body.input", "body.messages", "body.messages", "body.messages",
                   "body.input", "body.messages", "body.input")
        raise pydantic_errors([(loc, "missing", "Field required", body) for loc in missing])
    if not _is_message_list(messages):
        raise pydantic_errors([("body.messages", "list_type", "Input should be a valid list",
                                messages)])
    return [tokenizer.encode(render_chat_prompt(messages))]


def _truncation(body: dict, config: SimConfig) -> int | None:
    size = lax_int(body, "truncate_prompt_tokens")
    if size is None:
        return None
    if size < -1:
        raise pydantic_errors([("body.truncate_prompt_tokens", "greater_than_equal",
                                "Input should be greater than or equal to -1", size,
                                {"ge": -1})])
    if size > config.max_model_len:
        raise bad_request("truncate_prompt_tokens value is greater than max_model_len. Please "
                          "request a smaller truncation size.")
    return config.max_model_len if size == -1 else size


def parse_embedding_request(body: dict, config: SimConfig,
                            tokenizer: SimTokenizer) -> EmbeddingRequest:
    if "normalize" in body:
        raise bad_request("Parameter `normalize` was removed; use `use_activation` instead. "
                          "(parameter=normalize)", "normalize")
    prompts = _embedding_prompts(body, tokenizer)
    encoding_format = _literal(body, "encoding_format", ENCODING_FORMATS)
    embed_dtype = _literal(body, "embed_dtype", EMBED_DTYPES)
    endianness = _literal(body, "endianness", ENDIANNESS)
    dimensions = lax_int(body, "dimensions")
    lax_int(body, "priority")  # parsed as vLLM parses it; a pooling call never waits here
    _check_pooling_model(body, config)
    keep = _truncation(body, config)
    for index, ids in enumerate(prompts):
        if not ids:
            raise bad_request("The decoder prompt cannot be empty")
        for token in ids:
            if not tokenizer.in_vocabulary(token):
                raise bad_request(f"Token id {token} is out of vocabulary")
        if keep:
            prompts[index] = ids = ids[-keep:]
        if len(ids) > config.max_model_len:
            raise _too_long(len(ids), config.max_model_len)
    if dimensions is not None:
        raise bad_request(f"Model '{config.model}' does not support Matryoshka embeddings; "
                          f"dimensions must be unset (received dimensions={dimensions}).")
    if embed_dtype.startswith("fp8") and encoding_format != "float":
        raise bad_request(f"The sim engine does not encode embed_dtype={embed_dtype}; use "
                          "float32, float16 or bfloat16.")
    return EmbeddingRequest(prompts, encoding_format, embed_dtype, endianness)


# ---------------------------------------------------------------- score and rerank


@dataclass(slots=True)
class ScoreRequest:
    queries: list[str]
    documents: list[str]
    top_n: int = 0  # rerank only; 0: all


def _score_input_errors(loc: str, value: object) -> list[tuple]:
    """What is wrong with a `str | ScoreMultiModalParam | list[...]` field (the sim scores text
    only, so a multi-modal part is refused like any other non-string)."""
    if isinstance(value, str):
        return []
    if isinstance(value, list):
        bad = [i for i, item in enumerate(value) if not isinstance(item, str)]
        if not bad:
            return []
        return [(loc, "string_type", "Input should be a valid string", value),
                (f"{loc}.{bad[0]}.str", "string_type", "Input should be a valid string",
                 value[bad[0]])]
    return [(loc, "string_type", "Input should be a valid string", value),
            (f"{loc}.ScoreMultiModalParam", "dict_type", "Input should be a valid dictionary",
             value),
            (loc, "list_type", "Input should be a valid list", value)]


def _field_errors(body: dict, fields: tuple[str, ...]) -> list[tuple]:
    errors: list[tuple] = []
    for field in fields:
        if field not in body:
            errors.append((f"body.{field}", "missing", "Field required", body))
        else:
            errors.extend(_score_input_errors(f"body.{field}", body[field]))
    return errors


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _check_pairing(queries: list[str], documents: list[str]) -> None:
    if len(queries) > 1 and len(queries) != len(documents):
        raise bad_request("Input lengths must be either 1:1, 1:N or N:N")
    if not queries:
        raise bad_request("At least one text element must be given")
    if not documents:
        raise bad_request("At least one text_pair element must be given")


def parse_score_request(body: dict, config: SimConfig) -> ScoreRequest:
    errors: list[tuple] = []
    for fields in _SCORE_FIELDS:
        member = _field_errors(body, fields)
        if not member:
            queries, documents = (_as_list(body[f]) for f in fields)
            break
        errors.extend(member)
    else:
        raise pydantic_errors(errors)
    _check_pooling_model(body, config)
    _check_pairing(queries, documents)
    return ScoreRequest(queries, documents)


def parse_rerank_request(body: dict, config: SimConfig) -> ScoreRequest:
    errors = _field_errors(body, ("query",))
    if isinstance(body.get("query"), list):
        errors = [("body.query", "string_type", "Input should be a valid string", body["query"])]
    errors += _field_errors(body, ("documents",))
    top_n = lax_int(body, "top_n", 0)
    if top_n < 0:
        errors.append(("body.top_n", "greater_than_equal",
                       "Input should be greater than or equal to 0", top_n, {"ge": 0}))
    if errors:
        raise pydantic_errors(errors)
    _check_pooling_model(body, config)
    queries, documents = [body["query"]], _as_list(body["documents"])
    _check_pairing(queries, documents)
    return ScoreRequest(queries, documents, top_n)


# ---------------------------------------------------------------- tokenize and detokenize


@dataclass(slots=True)
class TokenizeRequest:
    text: str
    add_special_tokens: bool
    return_token_strs: bool


def parse_tokenize_request(body: dict, config: SimConfig) -> TokenizeRequest:
    """The completion form (`prompt`) first, else the chat form (`messages`), as vLLM's union."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if not isinstance(prompt, str):
        errors = [("body.prompt", "missing", "Field required", body) if "prompt" not in body
                  else ("body.prompt", "string_type", "Input should be a valid string", prompt)]
        if "messages" not in body:
            raise pydantic_errors([*errors, ("body.messages", "missing", "Field required",
                                             body)])
        if not isinstance(messages, list):
            raise pydantic_errors([*errors, ("body.messages", "list_type",
                                             "Input should be a valid list", messages)])
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise pydantic_errors([(f"body.messages.{index}.role", "missing",
                                        "Field required", message)])
        if lax_bool(body, "continue_final_message") and lax_bool(body, "add_generation_prompt",
                                                                  True):
            raise bad_request("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.")
        check_served_model(body, config)
        # The chat form counts as a chat completion's prompt does, whatever the special tokens.
        return TokenizeRequest(render_chat_prompt(messages), True,
                               lax_bool(body, "return_token_strs"))
    request = TokenizeRequest(prompt, lax_bool(body, "add_special_tokens", True),
                              lax_bool(body, "return_token_strs"))
    check_served_model(body, config)
    return request


def parse_detokenize_request(body: dict, config: SimConfig) -> list[int]:
    tokens = body.get("tokens")
    if "tokens" not in body:
        raise pydantic_errors([("body.tokens", "missing", "Field required", body)])
    if not isinstance(tokens, list):
        raise pydantic_errors([("body.tokens", "list_type", "Input should be a valid list",
                                tokens)])
    errors: list[tuple] = []
    for index, token in enumerate(tokens):
        loc = f"body.tokens.{index}"
        if isinstance(token, bool) or not isinstance(token, int):
            errors.append((loc, "int_type", "Input should be a valid integer", token))
        elif token < 0:
            errors.append((loc, "greater_than_equal", "Input should be greater than or equal "
                           "to 0", token, {"ge": 0}))
    if errors:
        raise pydantic_errors(errors)
    check_served_model(body, config)
    return tokens
