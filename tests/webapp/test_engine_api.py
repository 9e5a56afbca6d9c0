"""The rest of vLLM's surface through the gateway, on the sim engine: embeddings, Responses,
Anthropic Messages, tokenize, rerank and score, and batch lines of the new kinds. The official
`openai` and `anthropic` SDKs are the clients; the bodies are whatever the engine answered."""

from __future__ import annotations

import io
import json
import math

import anthropic
import openai
import pytest
import urllib3

from tests.conftest import OTHER_TOKENS, TOKENS, raw_post, sdk, warm
from tests.harness import wait_for
from tests.webapp.test_bad_input import assert_anthropic_error, assert_openai_error

EMBED = "sim/embed"


@pytest.fixture(scope="module")
def warm_models(stack):
    warm(stack, "sim/fast")
    warm(stack, EMBED, embedding=True)
    return stack


def _claude(stack, token: str = TOKENS["realtime"], **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key=token, max_retries=0, **kw)


# -- embeddings ------------------------------------------------------------------------------

def test_embeddings_through_the_sdk_are_deterministic_per_input(warm_models):
    client = sdk(warm_models, TOKENS["realtime"])
    first = client.embeddings.create(model=EMBED, input=["the cat", "a dog", "the cat"])
    assert [d.index for d in first.data] == [0, 1, 2]
    vectors = [d.embedding for d in first.data]
    assert len(vectors[0]) > 8 and all(len(v) == len(vectors[0]) for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)
    assert first.usage.prompt_tokens > 0 and first.model == EMBED
    again = client.embeddings.create(model=EMBED, input="a dog")
    assert again.data[0].embedding == vectors[1]
    # The SDK's default asks base64; the floats are the same.
    assert client.embeddings.create(model=EMBED, input="a dog",
                                    encoding_format="float").data[0].embedding == vectors[1]


def test_a_route_refuses_a_model_of_the_other_kind(warm_models):
    for path, body in (("/v1/embeddings", {"model": "sim/fast", "input": "x"}),
                       ("/v1/rerank", {"model": "sim/fast", "query": "q", "documents": ["a"]}),
                       ("/v1/score", {"model": "sim/fast", "text_1": "a", "text_2": "b"}),
                       ("/v1/completions", {"model": EMBED, "prompt": "x", "max_tokens": 2}),
                       ("/v1/responses", {"model": EMBED, "input": "x"})):
        error = assert_openai_error(raw_post(warm_models, path, body), 400)
        assert (error["code"], error["param"]) == ("model_kind_mismatch", "model"), path
    with pytest.raises(anthropic.BadRequestError) as refused:
        _claude(warm_models).messages.create(model=EMBED, max_tokens=4,
                                             messages=[{"role": "user", "content": "x"}])
    assert "embedding model" in refused.value.body["error"]["message"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": EMBED}, 400, "input"),
    ({"model": EMBED, "input": 5}, 400, "input"),
    ({"model": EMBED, "input": [[1, "a"]]}, 400, "input"),
    ({"model": EMBED, "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"model": EMBED, "input": "x", "dimensions": "8"}, 400, "dimensions"),
    ({"model": ["sim/embed"], "input": "x"}, 400, "model"),
    ({"model": "no/such", "input": "x"}, 404, "model"),
])
def test_bad_embedding_bodies_are_refused_before_the_engine(warm_models, body, status, param):
    error = assert_openai_error(raw_post(warm_models, "/v1/embeddings", body), status)
    assert error["param"] == param, error


# -- Responses -------------------------------------------------------------------------------

def test_a_response_is_created_and_retrieved_from_the_engine_that_made_it(warm_models):
    client = sdk(warm_models, TOKENS["realtime"])
    made = client.responses.create(model="sim/fast", input="Say hi", max_output_tokens=8)
    assert made.id.startswith("resp_") and made.output_text
    assert made.status == "incomplete"  # cut by max_output_tokens, as vLLM says it
    assert made.usage.output_tokens == 8
    again = client.responses.retrieve(made.id)
    assert (again.id, again.output_text) == (made.id, made.output_text)
    # Another key of the same project sees it; another project's key never does.
    assert sdk(warm_models, TOKENS["all"]).responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.NotFoundError) as hidden:
        sdk(warm_models, OTHER_TOKENS["realtime"]).responses.retrieve(made.id)
    assert hidden.value.body["code"] == "response_not_found"
    # A response that is not running in the background cannot be cancelled: the engine says so.
    cancel = raw_post(warm_models, f"/v1/responses/{made.id}/cancel", {})
    assert 400 <= cancel.status < 500, cancel.data
    assert_openai_error(cancel)


def test_a_streamed_response_through_the_sdk(warm_models):
    client = sdk(warm_models, TOKENS["realtime"])
    events = list(client.responses.create(model="sim/fast", input="Count", stream=True,
                                          max_output_tokens=6))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed",
                                                           "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas
    made = events[0].response.id
    assert client.responses.retrieve(made).output_text == deltas


@pytest.mark.parametrize("response_id", ["resp_0123456789abcdef", "not-a-response", "x" * 300,
                                         "resp_%2e%2e"])
def test_unknown_or_malformed_response_ids_are_404(warm_models, response_id):
    for method in ("GET", "POST"):
        suffix = "/cancel" if method == "POST" else ""
        answer = urllib3.request(method, f"{warm_models.base_url}/v1/responses/{response_id}"
                                 f"{suffix}", retries=False,
                                 headers={"Authorization": f"Bearer {TOKENS['realtime']}"})
        assert assert_openai_error(answer, 404)["code"] == "response_not_found"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "sim/fast"}, "input"),
    ({"model": "sim/fast", "input": 3}, "input"),
    ({"model": "sim/fast", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "sim/fast", "input": "x", "stream": "yes"}, "stream"),
    ({"model": "sim/fast", "input": "x", "instructions": ["a"]}, "instructions"),
])
def test_bad_response_bodies_are_400(warm_models, body, param):
    error = assert_openai_error(raw_post(warm_models, "/v1/responses", body), 400)
    assert error["param"] == param


# -- Anthropic Messages ------------------------------------------------------------------------

def test_the_anthropic_sdk_works_unchanged(warm_models):
    client = _claude(warm_models)
    message = client.messages.create(model="sim/fast", max_tokens=6, system="Be brief.",
                                     messages=[{"role": "user", "content": "Hello"}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == 6 and message.stop_reason == "max_tokens"
    with client.messages.stream(model="sim/fast", max_tokens=5,
                                messages=[{"role": "user", "content": "Hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text and final.usage.output_tokens == 5
    # count_tokens counts what the same call takes as input, system prompt included.
    counted = client.messages.count_tokens(model="sim/fast", system="Be brief.",
                                           messages=[{"role": "user", "content": "Hello"}])
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_anthropic_errors_are_in_anthropic_shape(warm_models):
    bearer = urllib3.request(
        "POST", f"{warm_models.base_url}/v1/messages", retries=False,
        body=json.dumps({"model": "sim/fast", "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Authorization": f"Bearer {TOKENS['realtime']}",
                 "Content-Type": "application/json"})
    assert bearer.status == 200 and bearer.json()["type"] == "message"
    with pytest.raises(anthropic.AuthenticationError) as refused:
        _claude(warm_models, token="wrong").messages.create(
            model="sim/fast", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError):
        _claude(warm_models, token=TOKENS["batch"]).messages.create(
            model="sim/fast", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.NotFoundError) as unknown:
        _claude(warm_models).messages.create(model="no/such", max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.body["error"]["type"] == "not_found_error"
    for body in ({"model": "sim/fast", "messages": [{"role": "user", "content": "hi"}]},
                 {"model": "sim/fast", "max_tokens": 2, "messages": []},
                 {"model": "sim/fast", "max_tokens": 2, "messages": [{"role": "user"}]},
                 {"model": "sim/fast", "max_tokens": 2, "system": 5,
                  "messages": [{"role": "user", "content": "hi"}]}):
        answer = raw_post(warm_models, "/v1/messages", body)
        assert_anthropic_error(answer, 400)
    # The engine's own refusals come in Anthropic's shape too (a prompt over the context).
    too_long = raw_post(warm_models, "/v1/messages", {
        "model": "sim/fast", "max_tokens": 100_000,
        "messages": [{"role": "user", "content": "hi"}]})
    assert_anthropic_error(too_long)


# -- tokenize, rerank, score -------------------------------------------------------------------

def test_tokenize_and_detokenize_round_trip(warm_models):
    tokens = raw_post(warm_models, "/tokenize", {"model": "sim/fast", "prompt": "hello world"})
    assert tokens.status == 200, tokens.data
    ids = tokens.json()["tokens"]
    assert ids and tokens.json()["count"] == len(ids)
    text = raw_post(warm_models, "/detokenize", {"model": "sim/fast", "tokens": ids})
    assert text.status == 200 and "hello world" in text.json()["prompt"]
    # Embedding models tokenize too; the counts agree with what a completion is charged.
    embedded = raw_post(warm_models, "/tokenize", {"model": EMBED, "prompt": "hello world"})
    assert embedded.status == 200 and embedded.json()["count"] == len(ids)
    completion = raw_post(warm_models, "/v1/completions",
                          {"model": "sim/fast", "prompt": "hello world", "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == len(ids)
    for body, param in (({"model": "sim/fast"}, "prompt"),
                        ({"model": "sim/fast", "prompt": 3}, "prompt"),
                        ({"model": "sim/fast", "tokens": ["a"]}, "tokens")):
        path = "/detokenize" if "tokens" in body else "/tokenize"
        assert assert_openai_error(raw_post(warm_models, path, body), 400)["param"] == param


def test_rerank_and_score_from_an_embedding_model(warm_models):
    ranked = raw_post(warm_models, "/v1/rerank", {"model": EMBED, "query": "cats",
                                                  "documents": ["cats", "stocks", "dogs"]})
    assert ranked.status == 200, ranked.data
    results = ranked.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 0  # the query itself is most like itself
    scored = raw_post(warm_models, "/v1/score", {"model": EMBED, "text_1": "cats",
                                                 "text_2": ["cats", "dogs"]})
    assert scored.status == 200, scored.data
    values = [d["score"] for d in scored.json()["data"]]
    assert len(values) == 2 and math.isclose(values[0], 1.0, rel_tol=1e-3) and values[1] < 1
    bad = raw_post(warm_models, "/v1/rerank", {"model": EMBED, "query": "q", "documents": 3})
    assert assert_openai_error(bad, 400)["param"] == "documents"


# -- batch lines of the new kinds ----------------------------------------------------------------

def _run_batch(stack, endpoint: str, lines: list[dict]):
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file = sdk(stack, TOKENS["upload"]).files.create(file=("in.jsonl", io.BytesIO(data)),
                                                     purpose="batch")
    client = sdk(stack, TOKENS["batch"])
    batch = client.batches.create(input_file_id=file.id, endpoint=endpoint,
                                  completion_window="24h")
    return client, wait_for(lambda: (b := client.batches.retrieve(batch.id)).status in (
        "completed", "failed") and b, 60, interval=0.2, what="the batch")


def test_a_batch_of_embedding_and_response_lines(warm_models):
    client, batch = _run_batch(warm_models, "/v1/embeddings", [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": EMBED, "input": f"text {i}", "encoding_format": "float"}}
        for i in range(5)])
    assert batch.status == "completed" and batch.request_counts.completed == 5
    rows = [json.loads(line) for line in client.files.content(batch.output_file_id).text
            .splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"e{i}" for i in range(5)]
    direct = sdk(warm_models, TOKENS["realtime"]).embeddings.create(
        model=EMBED, input="text 3", encoding_format="float").data[0].embedding
    row = next(r for r in rows if r["custom_id"] == "e3")
    assert row["response"]["body"]["data"][0]["embedding"] == direct

    client, batch = _run_batch(warm_models, "/v1/responses", [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": "sim/fast", "input": f"q {i}", "max_output_tokens": 3}}
        for i in range(3)])
    assert batch.status == "completed" and batch.request_counts.completed == 3
    rows = [json.loads(line) for line in client.files.content(batch.output_file_id).text
            .splitlines()]
    assert all(r["response"]["body"]["object"] == "response" for r in rows)


def test_batch_lines_of_the_wrong_kind_or_streamed_fail_validation(warm_models):
    for endpoint, body, code in (
            ("/v1/embeddings", {"model": "sim/fast", "input": "x"}, "model_kind_mismatch"),
            ("/v1/completions", {"model": EMBED, "prompt": "x"}, "model_kind_mismatch"),
            ("/v1/responses", {"model": "sim/fast", "input": "x", "stream": True},
             "invalid_body")):
        _, batch = _run_batch(warm_models, endpoint, [
            {"custom_id": "a", "method": "POST", "url": endpoint, "body": body}])
        assert batch.status == "failed", batch
        assert batch.errors.data[0].code == code, batch.errors
