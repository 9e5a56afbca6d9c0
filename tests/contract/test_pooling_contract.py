"""The pooling contract: vLLM's embedding surface (`--runner pooling`) and its tokenizer routes,
checked against the sim and the real vLLM alike (each test runs on both). Where they disagree,
the sim is wrong.

The pooling engines serve the tiny model as an embedding model (`contract/vllm-embed`: vLLM's
`--runner pooling`, whose `--convert auto` picks the embed adapter for a causal LM) and the sim
beside it (`contract/sim-embed`, `--runner pooling --hidden-size 128`). The tests compare shapes,
fields, counts within one engine, status codes and vLLM's words; never vector values across
engines (the sim's vectors are hashes, the tiny model's are noise). The expected messages were
read off vLLM 0.32.0; where vLLM lists one error per member of a union of request models, the
sim's list starts alike (same param, same first error) and these tests read that first error.
"""

from __future__ import annotations

import base64
import json
import math
import struct

import openai
import pytest

from tests.contract.conftest import EMBED_HIDDEN, MAX_MODEL_LEN

USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"}
NOT_FOUND = {"detail": "Not Found"}


def _json(response) -> dict:
    return json.loads(response.data)


def _error(response) -> dict:
    return _json(response)["error"]


def _first_error(message: str) -> str:
    """The first of pydantic's error lines in a validation message."""
    return message.split("\n")[1].strip()


def _embed(engine, body: dict):
    return engine.post("/v1/embeddings", {"model": engine.model, **body})


def _vector(engine, text) -> list[float]:
    response = _embed(engine, {"input": text, "encoding_format": "float"})
    assert response.status == 200, response.data
    return _json(response)["data"][0]["embedding"]


def _count(engine, text: str) -> int:
    response = engine.post("/tokenize", {"model": engine.model, "prompt": text})
    assert response.status == 200, response.data
    return _json(response)["count"]


# ---------------------------------------------------------------- models and routes


def test_models_list_the_pooling_model(embed_engine):
    (entry,) = _json(embed_engine.get("/v1/models"))["data"]
    assert entry["id"] == embed_engine.model and entry["object"] == "model"
    assert entry["owned_by"] == "vllm" and entry["max_model_len"] == MAX_MODEL_LEN
    assert entry["root"]
    assert embed_engine.engine.probe(embed_engine.endpoint, embed_engine.model)


def test_a_pooling_engine_serves_no_generation_route(embed_engine):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}]})):
        response = embed_engine.post(path, {"model": embed_engine.model, **body})
        assert (response.status, _json(response)) == (404, NOT_FOUND), path
    with pytest.raises(openai.NotFoundError):
        embed_engine.client().completions.create(model=embed_engine.model, prompt="hi",
                                                 max_tokens=1)
    wrong_method = embed_engine.get("/v1/embeddings")
    assert (wrong_method.status, _json(wrong_method)) == (405, {"detail": "Method Not Allowed"})
    assert embed_engine.get("/health").status == 200


def test_a_generate_engine_serves_no_pooling_route(engine):
    for path in ("/v1/embeddings", "/score", "/v1/score", "/rerank", "/v1/rerank"):
        response = engine.post(path, {"model": engine.model, "input": "hi"})
        assert (response.status, _json(response)) == (404, NOT_FOUND), path


def test_a_generate_engine_tokenizes_as_it_counts(engine):
    text = "hello there world"
    count = _count(engine, text)
    completion = engine.client().completions.create(model=engine.model, prompt=text,
                                                    max_tokens=1)
    assert completion.usage.prompt_tokens == count
    messages = [{"role": "user", "content": text}]
    chat = engine.post("/tokenize", {"model": engine.model, "messages": messages})
    answered = engine.client().chat.completions.create(model=engine.model, messages=messages,
                                                       max_tokens=1)
    assert _json(chat)["count"] == answered.usage.prompt_tokens


# ---------------------------------------------------------------- embeddings


def test_embedding_shape_and_usage(embed_engine):
    response = _embed(embed_engine, {"input": "hello there world"})
    assert response.status == 200
    body = _json(response)
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("embd-") and body["object"] == "list"
    assert body["model"] == embed_engine.model and isinstance(body["created"], int)
    (item,) = body["data"]
    assert set(item) == {"index", "object", "embedding"}
    assert (item["index"], item["object"]) == (0, "embedding")
    assert len(item["embedding"]) == EMBED_HIDDEN
    assert math.isclose(math.fsum(x * x for x in item["embedding"]), 1.0, rel_tol=1e-4)
    usage = body["usage"]
    assert set(usage) == USAGE_KEYS
    count = _count(embed_engine, "hello there world")
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (count, count)
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens_details"] is None


def test_embeddings_through_the_openai_sdk(embed_engine):
    client = embed_engine.client()
    floats = client.embeddings.create(model=embed_engine.model, input=["one", "two words"],
                                      encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == EMBED_HIDDEN for d in floats.data)
    # The SDK's default asks for base64 and decodes it: the same float32s.
    decoded = client.embeddings.create(model=embed_engine.model, input=["one", "two words"])
    for a, b in zip(decoded.data, floats.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6


@pytest.mark.parametrize(("value", "vectors", "tokens"), [
    ([5, 6, 7], 1, 3),
    ([[5, 6, 7], [8, 9]], 2, 5),
    ([[5]], 1, 1),
])
def test_token_id_inputs(embed_engine, value, vectors, tokens):
    body = _json(_embed(embed_engine, {"input": value}))
    assert len(body["data"]) == vectors
    assert body["usage"]["prompt_tokens"] == tokens


def test_text_inputs_count_as_tokenize_counts(embed_engine):
    texts = ["hello", "the quick brown fox", ""]
    body = _json(_embed(embed_engine, {"input": texts}))
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == sum(_count(embed_engine, t) for t in texts)
    assert _count(embed_engine, "") == 1  # the begin-of-sequence token alone
    chat = _embed(embed_engine, {"messages": [{"role": "user", "content": "hello"}]})
    assert chat.status == 200 and len(_json(chat)["data"]) == 1


def test_same_input_same_vector_different_input_different_vector(embed_engine):
    first = _vector(embed_engine, "the quick brown fox")
    again = _vector(embed_engine, "the quick brown fox")
    assert max(abs(a - b) for a, b in zip(first, again, strict=True)) < 1e-5
    other = _vector(embed_engine, "a lazy dog sleeps")
    assert max(abs(a - b) for a, b in zip(first, other, strict=True)) > 1e-3


@pytest.mark.parametrize(("endianness", "order"), [("native", "<"), ("little", "<"),
                                                   ("big", ">")])
def test_base64_is_the_float32_vector(embed_engine, endianness, order):
    floats = _vector(embed_engine, "hello")
    body = _json(_embed(embed_engine, {"input": "hello", "encoding_format": "base64",
                                       "endianness": endianness}))
    raw = base64.b64decode(body["data"][0]["embedding"])
    decoded = struct.unpack(f"{order}{EMBED_HIDDEN}f", raw)
    assert max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-6
    half = _json(_embed(embed_engine, {"input": "hello", "encoding_format": "base64",
                                       "embed_dtype": "float16"}))
    assert len(base64.b64decode(half["data"][0]["embedding"])) == 2 * EMBED_HIDDEN


def test_bytes_encoding(embed_engine):
    response = _embed(embed_engine, {"input": ["hello", "world"], "encoding_format": "bytes"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    meta = json.loads(response.headers["metadata"])
    assert set(meta) == {"id", "created", "model", "data", "usage"}
    assert [(d["index"], d["start"], d["end"], list(d["shape"])) for d in meta["data"]] == [
        (0, 0, 4 * EMBED_HIDDEN, [EMBED_HIDDEN]),
        (1, 4 * EMBED_HIDDEN, 8 * EMBED_HIDDEN, [EMBED_HIDDEN])]
    assert set(meta["usage"]) == {"prompt_tokens", "total_tokens"}
    assert len(response.data) == 8 * EMBED_HIDDEN
    only = _embed(embed_engine, {"input": "hello", "encoding_format": "bytes_only"})
    assert only.status == 200 and "metadata" not in only.headers


TOO_LONG = ("This model's maximum context length is 2048 tokens. However, your prompt contains "
            "at least 2049 input tokens, which exceeds this limit even without any output "
            "tokens. Please reduce the length of the input prompt. (parameter=input_tokens, "
            "value=2049)")


@pytest.mark.parametrize(("body", "message", "param"), [
    ({"input": []}, "You must pass at least one prompt", None),
    ({"input": [[]]}, "The decoder prompt cannot be empty", None),
    ({"input": [999999]}, "Token id 999999 is out of vocabulary", None),
    ({"input": [5] * (MAX_MODEL_LEN + 1)}, TOO_LONG, "input_tokens"),
    ({"input": "a " * (MAX_MODEL_LEN + 50)}, TOO_LONG, "input_tokens"),
    ({"input": "hi", "normalize": True},
     "Parameter `normalize` was removed; use `use_activation` instead. (parameter=normalize)",
     "normalize"),
    ({"input": "hi", "truncate_prompt_tokens": MAX_MODEL_LEN + 1},
     "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller "
     "truncation size.", None),
    ({"input": "hi", "dimensions": 16}, "Model '{model}' does not support Matryoshka "
     "embeddings; dimensions must be unset (received dimensions=16).", None),
])
def test_refused_embeddings(embed_engine, body, message, param):
    response = _embed(embed_engine, body)
    assert response.status == 400
    assert _error(response) == {"message": message.format(model=embed_engine.model),
                                "type": "BadRequestError", "param": param, "code": 400}


def test_a_longest_prompt_is_embedded(embed_engine):
    body = _json(_embed(embed_engine, {"input": [5] * MAX_MODEL_LEN}))
    assert body["usage"]["prompt_tokens"] == MAX_MODEL_LEN
    truncated = _json(_embed(embed_engine, {"input": [5, 6, 7, 8, 9],
                                            "truncate_prompt_tokens": 2}))
    assert truncated["usage"]["prompt_tokens"] == 2


def test_an_embeddings_body_without_input(embed_engine):
    response = _embed(embed_engine, {})
    assert response.status == 400
    missing = ["input", "messages", "messages", "messages", "input", "messages", "input"]
    lines = [f"  {{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required', "
             f"'input': '<dict of 1 items>'}}" for field in missing]
    assert _error(response) == {"message": "\n".join(["7 validation errors:", *lines]),
                                "type": "Bad Request", "param": "body.input", "code": 400}


@pytest.mark.parametrize(("body", "param", "first"), [
    ({"input": 5}, "body.input",
     "{'type': 'list_type', 'loc': 'body.input', 'msg': 'Input should be a valid list', "
     "'input': '5'}"),
    ({"input": ["a", 5]}, "body.input.0",
     "{'type': 'int_parsing', 'loc': 'body.input.0', 'msg': 'Input should be a valid integer, "
     "unable to parse string as an integer', 'input': 'a'}"),
    ({"input": "x", "encoding_format": "hex"}, "body.encoding_format",
     "{'type': 'literal_error', 'loc': 'body.encoding_format', 'msg': \"Input should be "
     "'float', 'base64', 'bytes' or 'bytes_only'\", 'input': 'hex', 'ctx': {'expected': "
     "\"'float', 'base64', 'bytes' or 'bytes_only'\"}}"),
    ({"input": "x", "embed_dtype": "int8"}, "body.embed_dtype",
     "{'type': 'literal_error', 'loc': 'body.embed_dtype', 'msg': \"Input should be 'float32', "
     "'float16', 'bfloat16', 'fp8_e4m3' or 'fp8_e5m2'\", 'input': 'int8', 'ctx': {'expected': "
     "\"'float32', 'float16', 'bfloat16', 'fp8_e4m3' or 'fp8_e5m2'\"}}"),
])
def test_embedding_fields_of_the_wrong_type(embed_engine, body, param, first):
    response = _embed(embed_engine, body)
    assert response.status == 400
    error = _error(response)
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", param, 400)
    assert _first_error(error["message"]) == first


def test_unknown_model_on_the_pooling_routes(embed_engine):
    for path, body in (("/v1/embeddings", {"input": "hi"}),
                       ("/v1/score", {"text_1": "a", "text_2": "b"}),
                       ("/rerank", {"query": "a", "documents": ["b"]})):
        response = embed_engine.post(path, {"model": "some/other-model", **body})
        assert response.status == 404, path
        assert _error(response) == {"message": "The model `some/other-model` does not exist.",
                                    "type": "NotFoundError", "param": None, "code": 404}


# ---------------------------------------------------------------- score and rerank


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_shape(embed_engine, path):
    response = embed_engine.post(path, {"model": embed_engine.model, "text_1": "hello",
                                        "text_2": ["hello", "world peace"]})
    assert response.status == 200
    body = _json(response)
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("score-") and body["object"] == "list"
    assert [(d["index"], d["object"]) for d in body["data"]] == [(0, "score"), (1, "score")]
    assert math.isclose(body["data"][0]["score"], 1.0, abs_tol=1e-5)  # a text and itself
    assert -1 <= body["data"][1]["score"] < 1
    assert set(body["usage"]) == USAGE_KEYS
    read = sum(_count(embed_engine, t) for t in ("hello", "hello", "world peace"))
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == read


@pytest.mark.parametrize("fields", [("queries", "documents"), ("queries", "items"),
                                    ("data_1", "data_2"), ("text_1", "text_2")])
def test_score_field_names(embed_engine, fields):
    first, second = fields
    response = embed_engine.post("/score", {"model": embed_engine.model,
                                            first: ["a", "b"], second: ["a", "c"]})
    assert response.status == 200, response.data
    scores = [d["score"] for d in _json(response)["data"]]
    assert len(scores) == 2 and math.isclose(scores[0], 1.0, abs_tol=1e-5)


@pytest.mark.parametrize(("body", "message"), [
    ({"text_1": ["a", "b"], "text_2": ["a", "c", "d"]},
     "Input lengths must be either 1:1, 1:N or N:N"),
    ({"text_1": [], "text_2": ["a"]}, "At least one text element must be given"),
    ({"text_1": "a", "text_2": []}, "At least one text_pair element must be given"),
])
def test_refused_score_pairings(embed_engine, body, message):
    response = embed_engine.post("/v1/score", {"model": embed_engine.model, **body})
    assert response.status == 400
    assert _error(response) == {"message": message, "type": "BadRequestError", "param": None,
                                "code": 400}


def test_a_score_body_without_its_pair(embed_engine):
    response = embed_engine.post("/v1/score", {"model": embed_engine.model, "text_1": "a"})
    assert response.status == 400
    missing = ["queries", "documents", "queries", "items", "data_1", "data_2", "text_2"]
    lines = [f"  {{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required', "
             f"'input': '<dict of 2 items>'}}" for field in missing]
    assert _error(response) == {"message": "\n".join(["7 validation errors:", *lines]),
                                "type": "Bad Request", "param": "body.queries", "code": 400}


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_shape(embed_engine, path):
    documents = ["world peace", "hello", "hello world"]
    response = embed_engine.post(path, {"model": embed_engine.model, "query": "hello",
                                        "documents": documents})
    assert response.status == 200
    body = _json(response)
    assert set(body) == {"id", "model", "usage", "results"}
    assert body["id"].startswith("score-") and body["model"] == embed_engine.model
    results = body["results"]
    assert all(set(r) == {"index", "document", "relevance_score"} for r in results)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 1 and math.isclose(scores[0], 1.0, abs_tol=1e-5)
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(r["document"] == {"text": documents[r["index"]], "multi_modal": None}
               for r in results)
    read = sum(_count(embed_engine, t) for t in ["hello", *documents])
    assert body["usage"] == {"prompt_tokens": read, "total_tokens": read}
    top = _json(embed_engine.post(path, {"model": embed_engine.model, "query": "hello",
                                         "documents": documents, "top_n": 2}))
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]


@pytest.mark.parametrize(("body", "message", "param"), [
    ({"documents": ["a"]}, "1 validation error:\n  {'type': 'missing', 'loc': 'body.query', "
     "'msg': 'Field required', 'input': '<dict of 2 items>'}", "body.query"),
    ({"query": "a"}, "1 validation error:\n  {'type': 'missing', 'loc': 'body.documents', "
     "'msg': 'Field required', 'input': '<dict of 2 items>'}", "body.documents"),
    ({"query": "a", "documents": ["b"], "top_n": -1},
     "1 validation error:\n  {'type': 'greater_than_equal', 'loc': 'body.top_n', 'msg': "
     "'Input should be greater than or equal to 0', 'input': '-1', 'ctx': {'ge': 0}}",
     "body.top_n"),
])
def test_refused_rerank_bodies(embed_engine, body, message, param):
    response = embed_engine.post("/v1/rerank", {"model": embed_engine.model, **body})
    assert response.status == 400
    assert _error(response) == {"message": message, "type": "Bad Request", "param": param,
                                "code": 400}
    empty = embed_engine.post("/rerank", {"model": embed_engine.model, "query": "a",
                                          "documents": []})
    assert _error(empty)["message"] == "At least one text_pair element must be given"


# ---------------------------------------------------------------- tokenize and detokenize


def test_tokenize_shape(embed_engine):
    response = embed_engine.post("/tokenize", {"model": embed_engine.model,
                                               "prompt": "hello world"})
    assert response.status == 200
    body = _json(response)
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] is None
    shown = _json(embed_engine.post("/tokenize", {"model": embed_engine.model,
                                                  "prompt": "hello world",
                                                  "return_token_strs": True}))
    assert shown["tokens"] == body["tokens"] and len(shown["token_strs"]) == body["count"]
    assert shown["token_strs"][-1] == "\u0120world"  # byte-level BPE marks the space
    bare = _json(embed_engine.post("/tokenize", {"model": embed_engine.model, "prompt": "",
                                                 "add_special_tokens": False}))
    assert (bare["count"], bare["tokens"]) == (0, [])
    messages = [{"role": "user", "content": "hello world"}]
    chat = _json(embed_engine.post("/tokenize", {"model": embed_engine.model,
                                                 "messages": messages}))
    assert chat["count"] == len(chat["tokens"]) > 0


def test_detokenize_reads_back_the_text(embed_engine):
    tokens = _json(embed_engine.post("/tokenize", {
        "model": embed_engine.model, "prompt": "hello world",
        "add_special_tokens": False}))["tokens"]
    response = embed_engine.post("/detokenize", {"model": embed_engine.model, "tokens": tokens})
    assert (response.status, _json(response)) == (200, {"prompt": "hello world"})
    empty = embed_engine.post("/detokenize", {"model": embed_engine.model, "tokens": []})
    assert _json(empty) == {"prompt": ""}


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/tokenize", {}, {
        "message": "2 validation errors:\n  {'type': 'missing', 'loc': 'body.prompt', 'msg': "
                   "'Field required', 'input': '<dict of 1 items>'}\n  {'type': 'missing', "
                   "'loc': 'body.messages', 'msg': 'Field required', 'input': "
                   "'<dict of 1 items>'}",
        "type": "Bad Request", "param": "body.prompt", "code": 400}),
    ("/tokenize", {"prompt": 5}, {
        "message": "2 validation errors:\n  {'type': 'string_type', 'loc': 'body.prompt', "
                   "'msg': 'Input should be a valid string', 'input': '5'}\n  {'type': "
                   "'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': "
                   "'<dict of 2 items>'}",
        "type": "Bad Request", "param": "body.prompt", "code": 400}),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "add_generation_prompt": True, "continue_final_message": True}, {
        "message": "Cannot set both `continue_final_message` and `add_generation_prompt` to "
                   "True.", "type": "BadRequestError", "param": None, "code": 400}),
    ("/detokenize", {}, {
        "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.tokens', 'msg': "
                   "'Field required', 'input': '<dict of 1 items>'}",
        "type": "Bad Request", "param": "body.tokens", "code": 400}),
    ("/detokenize", {"tokens": [-1]}, {
        "message": "1 validation error:\n  {'type': 'greater_than_equal', 'loc': "
                   "'body.tokens.0', 'msg': 'Input should be greater than or equal to 0', "
                   "'input': '-1', 'ctx': {'ge': 0}}",
        "type": "Bad Request", "param": "body.tokens.0", "code": 400}),
    ("/detokenize", {"tokens": "abc"}, {
        "message": "1 validation error:\n  {'type': 'list_type', 'loc': 'body.tokens', 'msg': "
                   "'Input should be a valid list', 'input': 'abc'}",
        "type": "Bad Request", "param": "body.tokens", "code": 400}),
])
def test_refused_tokenizer_bodies(embed_engine, path, body, error):
    response = embed_engine.post(path, {"model": embed_engine.model, **body})
    assert response.status == 400
    assert _error(response) == error


def test_unknown_model_on_the_tokenizer_routes(embed_engine):
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]})):
        response = embed_engine.post(path, {"model": "some/other-model", **body})
        assert response.status == 404
        assert _error(response) == {
            "message": f"The model `some/other-model` does not exist. Valid aliases: "
                       f"{embed_engine.model}.",
            "type": "NotFoundError", "param": "model", "code": 404}
