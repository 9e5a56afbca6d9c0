"""The sim engine's pooling surface (`--runner pooling`) and its tokenizer routes: real
`python -m runtimes.sim` processes on loopback, driven by the official `openai` SDK where the
route is OpenAI's (`/v1/embeddings`) and by raw HTTP for vLLM's own routes. What vLLM answers is
checked against the real engine in tests/contract/test_pooling_contract.py."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from tests.runtimes.test_sim import MODEL, REPO_ROOT, SimProcess, http_call, launch, stop

HIDDEN = 48


@pytest.fixture(scope="module")
def pooling_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    sim = launch(tmp_path_factory.mktemp("pooling"), "--runner", "pooling", "--hidden-size",
                 str(HIDDEN), "--max-model-len", "64")
    try:
        sim.wait_until_healthy()
        yield sim
    finally:
        stop(sim)


@pytest.fixture(scope="module")
def generate_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    sim = launch(tmp_path_factory.mktemp("generate"), "--max-model-len", "64")
    try:
        sim.wait_until_healthy()
        yield sim
    finally:
        stop(sim)


def post(sim: SimProcess, path: str, body: dict) -> tuple[int, dict]:
    status, _, data = http_call("POST", f"{sim.url}{path}", body)
    return status, json.loads(data)


def vector(sim: SimProcess, text: str | list) -> list[float]:
    status, body = post(sim, "/v1/embeddings", {"model": MODEL, "input": text,
                                                "encoding_format": "float"})
    assert status == 200, body
    return body["data"][0]["embedding"]


# ---------------------------------------------------------------- embeddings


def test_embeddings_through_the_openai_sdk(pooling_sim: SimProcess) -> None:
    client = pooling_sim.client()
    result = client.embeddings.create(model=MODEL, input="hello there world",
                                      encoding_format="float")
    assert result.object == "list" and result.model == MODEL
    assert result.id.startswith("embd-")  # type: ignore[attr-defined]
    [item] = result.data
    assert item.index == 0 and item.object == "embedding"
    assert len(item.embedding) == HIDDEN
    assert math.isclose(math.fsum(x * x for x in item.embedding), 1.0, rel_tol=1e-5)
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (3, 3)
    # The SDK asks for base64 when not told otherwise, and decodes it: the same float32s.
    decoded = client.embeddings.create(model=MODEL, input="hello there world").data[0]
    assert decoded.embedding == item.embedding


def test_every_input_shape_gets_one_vector_per_input(pooling_sim: SimProcess) -> None:
    client = pooling_sim.client()
    texts = client.embeddings.create(model=MODEL, input=["a b", "c d e"])
    assert [d.index for d in texts.data] == [0, 1]
    assert texts.usage.prompt_tokens == 5
    ids = client.embeddings.create(model=MODEL, input=[5, 6, 7])
    assert len(ids.data) == 1 and ids.usage.prompt_tokens == 3
    lists = client.embeddings.create(model=MODEL, input=[[5, 6, 7], [8, 9]])
    assert len(lists.data) == 2 and lists.usage.prompt_tokens == 5
    assert lists.data[0].embedding == ids.data[0].embedding
    chat = post(pooling_sim, "/v1/embeddings", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi there"}]})
    assert chat[0] == 200 and len(chat[1]["data"]) == 1


def test_embeddings_are_deterministic_and_tell_inputs_apart(pooling_sim: SimProcess) -> None:
    first = vector(pooling_sim, "the quick brown fox")
    assert vector(pooling_sim, "the quick brown fox") == first
    assert vector(pooling_sim, "the quick brown dog") != first
    assert vector(pooling_sim, "fox brown quick the") != first  # word order counts
    # A text and its own token ids are the same input.
    tokens = post(pooling_sim, "/tokenize", {"model": MODEL, "prompt": "the quick brown fox"})
    assert vector(pooling_sim, tokens[1]["tokens"]) == first


def test_base64_and_bytes_carry_the_float32_vector(pooling_sim: SimProcess) -> None:
    floats = vector(pooling_sim, "hello")
    for endianness, order in (("native", "<"), ("little", "<"), ("big", ">")):
        status, body = post(pooling_sim, "/v1/embeddings", {
            "model": MODEL, "input": "hello", "encoding_format": "base64",
            "endianness": endianness})
        assert status == 200
        raw = base64.b64decode(body["data"][0]["embedding"])
        assert list(struct.unpack(f"{order}{HIDDEN}f", raw)) == floats
    status, body = post(pooling_sim, "/v1/embeddings", {
        "model": MODEL, "input": "hello", "encoding_format": "base64", "embed_dtype": "float16"})
    halves = struct.unpack(f"<{HIDDEN}e", base64.b64decode(body["data"][0]["embedding"]))
    assert all(abs(h - f) < 1e-3 for h, f in zip(halves, floats, strict=True))
    status, headers, data = http_call("POST", f"{pooling_sim.url}/v1/embeddings", {
        "model": MODEL, "input": ["hello", "world"], "encoding_format": "bytes"})
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    meta = json.loads(headers["metadata"])
    assert [(d["start"], d["end"], d["shape"]) for d in meta["data"]] == [
        (0, 4 * HIDDEN, [HIDDEN]), (4 * HIDDEN, 8 * HIDDEN, [HIDDEN])]
    assert meta["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert list(struct.unpack(f"<{HIDDEN}f", data[:4 * HIDDEN])) == floats


def test_refused_embedding_bodies(pooling_sim: SimProcess) -> None:
    status, body = post(pooling_sim, "/v1/embeddings", {"model": MODEL})
    assert status == 400
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body.input", 400)
    assert error["message"].startswith("7 validation errors:\n  {'type': 'missing', "
                                       "'loc': 'body.input', 'msg': 'Field required'")
    with pytest.raises(openai.NotFoundError) as unknown:
        pooling_sim.client().embeddings.create(model="some/other", input="x")
    assert unknown.value.body["message"] == "The model `some/other` does not exist."
    with pytest.raises(openai.BadRequestError) as dims:
        pooling_sim.client().embeddings.create(model=MODEL, input="x", dimensions=8)
    assert "does not support Matryoshka embeddings" in dims.value.body["message"]
    cases = [
        ({"input": []}, "You must pass at least one prompt", None),
        ({"input": [[]]}, "The decoder prompt cannot be empty", None),
        ({"input": [32000]}, "Token id 32000 is out of vocabulary", None),
        ({"input": "a " * 65}, "(parameter=input_tokens, value=65)", "input_tokens"),
        ({"input": "x", "normalize": True}, "Parameter `normalize` was removed", "normalize"),
        ({"input": 5}, "'loc': 'body.input', 'msg': 'Input should be a valid list'",
         "body.input"),
        ({"input": ["a", 5]}, "'loc': 'body.input.0', 'msg': 'Input should be a valid integer",
         "body.input.0"),
        ({"input": "x", "encoding_format": "hex"},
         "Input should be 'float', 'base64', 'bytes' or 'bytes_only'", "body.encoding_format"),
    ]
    for extra, message, param in cases:
        status, body = post(pooling_sim, "/v1/embeddings", {"model": MODEL, **extra})
        assert status == 400, extra
        assert message in body["error"]["message"] and body["error"]["param"] == param, body
    assert post(pooling_sim, "/v1/embeddings", {"model": MODEL, "input": "a " * 64})[0] == 200


# ---------------------------------------------------------------- score and rerank


def test_score_is_the_cosine_of_the_embeddings(pooling_sim: SimProcess) -> None:
    status, body = post(pooling_sim, "/v1/score", {"model": MODEL, "text_1": "red fox",
                                                   "text_2": ["red fox", "blue sky"]})
    assert status == 200
    assert body["id"].startswith("score-") and body["object"] == "list"
    assert [d["object"] for d in body["data"]] == ["score", "score"]
    same, other = (d["score"] for d in body["data"])
    assert math.isclose(same, 1.0, rel_tol=1e-6)
    a, b = vector(pooling_sim, "red fox"), vector(pooling_sim, "blue sky")
    assert math.isclose(other, math.fsum(x * y for x, y in zip(a, b, strict=True)),
                        abs_tol=1e-5)
    assert body["usage"]["prompt_tokens"] == 6  # each text read once: 2 + 2 + 2
    n_to_n = post(pooling_sim, "/score", {"model": MODEL, "queries": ["a", "b"],
                                          "documents": ["a", "c"]})[1]
    assert len(n_to_n["data"]) == 2 and math.isclose(n_to_n["data"][0]["score"], 1.0,
                                                     rel_tol=1e-6)
    refusals = [({"text_1": ["a", "b"], "text_2": ["a", "b", "c"]},
                 "Input lengths must be either 1:1, 1:N or N:N"),
                ({"text_1": [], "text_2": ["a"]}, "At least one text element must be given"),
                ({"text_1": "a", "text_2": []}, "At least one text_pair element must be given")]
    for extra, message in refusals:
        status, body = post(pooling_sim, "/v1/score", {"model": MODEL, **extra})
        assert (status, body["error"]["message"]) == (400, message)
    status, body = post(pooling_sim, "/v1/score", {"model": MODEL, "text_1": "a"})
    assert status == 400 and body["error"]["param"] == "body.queries"
    assert body["error"]["message"].startswith("7 validation errors:")


def test_rerank_sorts_by_relevance_and_keeps_top_n(pooling_sim: SimProcess) -> None:
    documents = ["blue sky", "red fox", "red fox jumps"]
    status, body = post(pooling_sim, "/rerank", {"model": MODEL, "query": "red fox",
                                                 "documents": documents})
    assert status == 200 and set(body) == {"id", "model", "usage", "results"}
    results = body["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 1 and results[0]["document"] == {"text": "red fox",
                                                                   "multi_modal": None}
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    top = post(pooling_sim, "/v1/rerank", {"model": MODEL, "query": "red fox",
                                           "documents": documents, "top_n": 2})[1]
    assert top["results"] == results[:2]
    status, body = post(pooling_sim, "/v2/rerank", {"model": MODEL, "query": "x",
                                                    "documents": ["y"], "top_n": -1})
    assert status == 400 and body["error"]["param"] == "body.top_n"


# ---------------------------------------------------------------- tokenizer and runners


def test_one_count_of_prompt_tokens_everywhere(pooling_sim: SimProcess,
                                               generate_sim: SimProcess) -> None:
    text = "one two three four five"
    messages = [{"role": "user", "content": text}]
    for sim in (pooling_sim, generate_sim):
        status, body = post(sim, "/tokenize", {"model": MODEL, "prompt": text})
        assert status == 200 and set(body) == {"count", "max_model_len", "tokens", "token_strs"}
        assert (body["count"], len(body["tokens"]), body["max_model_len"]) == (5, 5, 64)
        chat = post(sim, "/tokenize", {"model": MODEL, "messages": messages})[1]
        assert chat["count"] == 6  # "user:" and the five words
    completion = generate_sim.client().completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert completion.usage.prompt_tokens == 5
    chat = generate_sim.client().chat.completions.create(model=MODEL, messages=messages,
                                                         max_tokens=1)
    assert chat.usage.prompt_tokens == 6
    embedded = pooling_sim.client().embeddings.create(model=MODEL, input=text)
    assert embedded.usage.prompt_tokens == 5


def test_tokenize_and_detokenize_shapes(pooling_sim: SimProcess) -> None:
    body = post(pooling_sim, "/tokenize", {"model": MODEL, "prompt": "hello big world",
                                           "return_token_strs": True})[1]
    assert body["token_strs"] == ["hello", "\u0120big", "\u0120world"]
    assert post(pooling_sim, "/detokenize", {"model": MODEL, "tokens": body["tokens"]}) == (
        200, {"prompt": "hello big world"})
    assert post(pooling_sim, "/tokenize", {"model": MODEL, "prompt": ""})[1]["tokens"] == [1]
    assert post(pooling_sim, "/tokenize", {"model": MODEL, "prompt": "",
                                           "add_special_tokens": False})[1]["count"] == 0
    status, body = post(pooling_sim, "/tokenize", {"model": MODEL})
    assert status == 400 and body["error"]["message"].startswith("2 validation errors:")
    status, body = post(pooling_sim, "/detokenize", {"model": MODEL, "tokens": [-1]})
    assert status == 400 and body["error"]["param"] == "body.tokens.0"
    status, body = post(pooling_sim, "/tokenize", {"model": "x/y", "prompt": "a"})
    assert status == 404 and body["error"] == {
        "message": f"The model `x/y` does not exist. Valid aliases: {MODEL}.",
        "type": "NotFoundError", "param": "model", "code": 404}


def test_each_runner_serves_only_its_routes(pooling_sim: SimProcess,
                                            generate_sim: SimProcess) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert post(pooling_sim, path, {"model": MODEL, "prompt": "x"}) == (
            404, {"detail": "Not Found"})
    for path in ("/v1/embeddings", "/v1/score", "/score", "/rerank", "/v1/rerank"):
        assert post(generate_sim, path, {"model": MODEL, "input": "x"}) == (
            404, {"detail": "Not Found"})
    status, _, data = http_call("GET", f"{pooling_sim.url}/v1/embeddings")
    assert (status, json.loads(data)) == (405, {"detail": "Method Not Allowed"})
    listed = [m.id for m in pooling_sim.client().models.list()]
    assert listed == [MODEL]


def test_a_pooling_runner_needs_the_embed_adapter() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtimes.sim", "--model", MODEL, "--port", "0", "--runner",
         "pooling", "--convert", "none"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=30)
    assert done.returncode != 0
    assert "This model does not support `--runner pooling`." in done.stderr
