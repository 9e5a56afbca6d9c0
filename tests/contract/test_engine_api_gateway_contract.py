"""The rest of vLLM's surface through the gateway, on the sim and on a real vLLM alike, with the
official SDKs as clients: embeddings (an embedding model of the catalog, vLLM's pooling
runner), Responses created, streamed and retrieved from the engine that made them, Anthropic's
Messages plain and streamed, count_tokens, tokenize and detokenize, rerank and score."""

from __future__ import annotations

import math

import anthropic
import openai
import pytest

from tests.conftest import OTHER_TOKENS, TOKENS, raw_post


def _claude(engine) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=engine.stack.base_url, api_key=TOKENS["realtime"],
                               max_retries=0, timeout=60)


def test_embeddings_rerank_and_score(embed_engine):
    client = embed_engine.gateway()
    made = client.embeddings.create(model=embed_engine.model, input=["snow", "rain", "snow"],
                                    encoding_format="float")
    vectors = [d.embedding for d in made.data]
    assert len(vectors) == 3 and vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-5)
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0, rel_tol=1e-2)
    assert made.usage.prompt_tokens > 0
    # The SDK's default (base64) decodes to the same floats.
    assert client.embeddings.create(model=embed_engine.model, input="rain").data[0] \
        .embedding == pytest.approx(vectors[1], abs=1e-5)
    ranked = raw_post(embed_engine.stack, "/v1/rerank", {
        "model": embed_engine.model, "query": "snow", "documents": ["rain", "snow"]})
    assert ranked.status == 200, ranked.data
    assert ranked.json()["results"][0]["index"] == 1  # the query itself ranks first
    scored = raw_post(embed_engine.stack, "/v1/score", {
        "model": embed_engine.model, "text_1": "snow", "text_2": ["snow", "rain"]})
    assert scored.status == 200, scored.data
    values = [d["score"] for d in scored.json()["data"]]
    assert values[0] == pytest.approx(1.0, abs=1e-3) and values[1] < values[0]
    tokens = raw_post(embed_engine.stack, "/tokenize",
                      {"model": embed_engine.model, "prompt": "snow and rain"})
    assert tokens.status == 200 and tokens.json()["count"] == len(tokens.json()["tokens"])
    # The generation routes refuse it before any engine is asked.
    refused = raw_post(embed_engine.stack, "/v1/completions",
                       {"model": embed_engine.model, "prompt": "x", "max_tokens": 1})
    assert refused.status == 400 and refused.json()["error"]["code"] == "model_kind_mismatch"


def test_responses_created_streamed_and_retrieved(engine):
    client = engine.gateway()
    made = client.responses.create(model=engine.model, input="Say something",
                                   max_output_tokens=6)
    assert made.id.startswith("resp_") and made.status == "incomplete"
    assert made.usage.output_tokens == 6 and made.output_text
    assert client.responses.retrieve(made.id).output_text == made.output_text
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{engine.stack.base_url}/v1", api_key=OTHER_TOKENS["realtime"],
                      max_retries=0).responses.retrieve(made.id)
    events = list(client.responses.create(model=engine.model, input="Go on", stream=True,
                                          max_output_tokens=5))
    assert events[0].type == "response.created"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and client.responses.retrieve(events[0].response.id).output_text == text
    # Only a background response can be cancelled: the engine's 400, in our envelope.
    cancel = raw_post(engine.stack, f"/v1/responses/{made.id}/cancel", {})
    assert cancel.status == 400 and "synchronous" in cancel.json()["error"]["message"]


def test_anthropic_messages_plain_streamed_and_counted(engine):
    client = _claude(engine)
    messages = [{"role": "user", "content": "Hello there"}]
    message = client.messages.create(model=engine.model, max_tokens=5, messages=messages)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5
    assert message.content[0].text
    with client.messages.stream(model=engine.model, max_tokens=4, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens == 4
    counted = client.messages.count_tokens(model=engine.model, messages=messages)
    assert counted.input_tokens == message.usage.input_tokens
    # The engine's refusal (max_tokens over the context) reaches the SDK in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=engine.model, max_tokens=100_000, messages=messages)
    assert refused.value.body["type"] == "error"


def test_tokenize_and_detokenize_round_trip(engine):
    tokens = raw_post(engine.stack, "/tokenize", {"model": engine.model, "prompt": "hello world"})
    assert tokens.status == 200, tokens.data
    ids = tokens.json()["tokens"]
    text = raw_post(engine.stack, "/detokenize", {"model": engine.model, "tokens": ids})
    assert text.status == 200 and "hello world" in text.json()["prompt"]
    completion = raw_post(engine.stack, "/v1/completions",
                          {"model": engine.model, "prompt": "hello world", "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == len(ids)
