"""The sim engine's routes beside generation: vLLM's tokenizer routes, and its pooling surface.

`/tokenize` and `/detokenize` are served by every vLLM, whatever its runner. With
`--runner pooling` vLLM serves an embedding model (a generative model converted with its
`--convert embed` adapter, which `auto` picks) on `/v1/embeddings`, `/score` and `/rerank` (each
also under vLLM's other paths) and serves no generation route; with `--runner generate` it
serves no pooling route. A route a server lacks is FastAPI's `404 {"detail": "Not Found"}`, a
method it lacks `405 {"detail": "Method Not Allowed"}`, and the sim answers both that way.

An embedding is a unit vector of `--hidden-size` dimensions, made from the token ids alone: the
sum of one seeded random vector per token, plus one for the whole sequence (so word order
counts). The same input always gets the same vector, texts that share words point alike, and
`/score` and `/rerank` are the cosine of two such vectors, as vLLM scores with an embedding model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from functools import lru_cache

from aiohttp import web

from runtimes.sim.config import SimConfig
from runtimes.sim.fields import ApiError
from runtimes.sim.pooling_protocol import (
    EmbeddingRequest,
    ScoreRequest,
    parse_detokenize_request,
    parse_embedding_request,
    parse_rerank_request,
    parse_score_request,
    parse_tokenize_request,
)
from runtimes.sim.protocol import read_json_object
from runtimes.sim.tokenizer import SimTokenizer

POOLING_RUNNER = "pooling"
_SEQUENCE_WEIGHT = 0.5  # of the whole sequence's vector, beside one per token
_BYTE_ORDER = {"native": "=", "little": "<", "big": ">"}


@dataclass(slots=True)
class PoolingState:
    config: SimConfig
    tokenizer: SimTokenizer = field(default_factory=SimTokenizer)


POOLING_KEY = web.AppKey("pooling", PoolingState)


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json(value: object) -> web.Response:
    return web.Response(body=_compact_json(value), content_type="application/json")


def _request_id(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(64):016x}"


def _usage(prompt_tokens: int) -> dict:
    # vLLM's UsageInfo, as its pooling routes send it.
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
            "completion_tokens": 0, "prompt_tokens_details": None,
            "completion_tokens_details": None}


# ---------------------------------------------------------------- vectors


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


@lru_cache(maxsize=65536)
def _token_vector(token: int, dims: int) -> tuple[float, ...]:
    rng = random.Random(_seed("token", token, dims))
    return tuple(rng.gauss(0.0, 1.0) for _ in range(dims))


def embed(ids: list[int], dims: int) -> list[float]:
    """The unit vector of a token sequence, rounded to float32 as a model's output is."""
    rng = random.Random(_seed("sequence", dims, *ids))
    total = [_SEQUENCE_WEIGHT * rng.gauss(0.0, 1.0) for _ in range(dims)]
    for token in ids:
        total = [a + b for a, b in zip(total, _token_vector(token, dims), strict=True)]
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return array("f", [x / norm for x in total]).tolist()


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0
    return array("f", [sum(x * y for x, y in zip(a, b, strict=True)) / norm])[0]


def encode_vector(vector: list[float], embed_dtype: str, endianness: str) -> bytes:
    """The bytes of `vector` as vLLM's base64 and bytes encodings carry them."""
    order = _BYTE_ORDER[endianness]
    if embed_dtype == "float16":
        return struct.pack(f"{order}{len(vector)}e", *vector)
    if embed_dtype == "bfloat16":
        # The top half of each float32, rounded to nearest even, as torch converts.
        bits = struct.unpack(f"={len(vector)}I", struct.pack(f"={len(vector)}f", *vector))
        halves = [((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF for b in bits]
        return struct.pack(f"{order}{len(halves)}H", *halves)
    packed = array("f", vector)
    if order == ">" or (order == "=" and sys.byteorder == "big"):
        packed.byteswap()
    return packed.tobytes()


# ---------------------------------------------------------------- responses


def _embeddings_response(state: PoolingState, request: EmbeddingRequest) -> web.Response:
    config = state.config
    vectors = [embed(ids, config.hidden_size) for ids in request.prompts]
    prompt_tokens = sum(len(ids) for ids in request.prompts)
    request_id, created = _request_id("embd"), int(time.time())
    if request.encoding_format in ("bytes", "bytes_only"):
        chunks = [encode_vector(v, request.embed_dtype, request.endianness) for v in vectors]
        headers = {}
        if request.encoding_format == "bytes":
            offsets = [0]
            for chunk in chunks:
                offsets.append(offsets[-1] + len(chunk))
            items = [{"index": i, "embed_dtype": request.embed_dtype,
                      "endianness": request.endianness, "start": offsets[i],
                      "end": offsets[i + 1], "shape": [config.hidden_size]}
                     for i in range(len(chunks))]
            headers["metadata"] = json.dumps({
                "id": request_id, "created": created, "model": config.model, "data": items,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
        return web.Response(body=b"".join(chunks), headers=headers,
                            content_type="application/octet-stream")
    if request.encoding_format == "base64":
        data: list = [base64.b64encode(encode_vector(v, request.embed_dtype,
                                                     request.endianness)).decode()
                      for v in vectors]
    else:
        data = vectors
    return _json({
        "id": request_id, "object": "list", "created": created, "model": config.model,
        "data": [{"index": i, "object": "embedding", "embedding": e} for i, e in enumerate(data)],
        "usage": _usage(prompt_tokens),
    })


def _pair_scores(state: PoolingState, request: ScoreRequest) -> tuple[list[float], int]:
    """The cosine of each (query, document) pair, 1:N or N:N, and the tokens read: each text
    is embedded once, as vLLM counts it."""
    dims = state.config.hidden_size
    query_ids = [state.tokenizer.encode(q) for q in request.queries]
    document_ids = [state.tokenizer.encode(d) for d in request.documents]
    queries = [embed(ids, dims) for ids in query_ids]
    if len(queries) == 1:
        queries = queries * len(document_ids)
    scores = [cosine(q, embed(ids, dims)) for q, ids in zip(queries, document_ids, strict=True)]
    return scores, sum(map(len, query_ids)) + sum(map(len, document_ids))


def _score_response(state: PoolingState, request: ScoreRequest) -> web.Response:
    scores, prompt_tokens = _pair_scores(state, request)
    return _json({
        "id": _request_id("score"), "object": "list", "created": int(time.time()),
        "model": state.config.model,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": _usage(prompt_tokens),
    })


def _rerank_response(state: PoolingState, request: ScoreRequest) -> web.Response:
    scores, prompt_tokens = _pair_scores(state, request)
    results = [{"index": i, "document": {"text": text, "multi_modal": None},
                "relevance_score": score}
               for i, (text, score) in enumerate(zip(request.documents, scores, strict=True))]
    results.sort(key=lambda r: r["relevance_score"], reverse=True)
    if 0 < request.top_n < len(results):
        results = results[:request.top_n]
    return _json({
        "id": _request_id("score"), "model": state.config.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "results": results,
    })


# ---------------------------------------------------------------- routes


async def _embeddings(request: web.Request) -> web.Response:
    state = request.app[POOLING_KEY]
    try:
        body = await read_json_object(request)
        parsed = parse_embedding_request(body, state.config, state.tokenizer)
    except ApiError as error:
        return error.response()
    return _embeddings_response(state, parsed)


async def _score(request: web.Request) -> web.Response:
    state = request.app[POOLING_KEY]
    try:
        parsed = parse_score_request(await read_json_object(request), state.config)
    except ApiError as error:
        return error.response()
    return _score_response(state, parsed)


async def _rerank(request: web.Request) -> web.Response:
    state = request.app[POOLING_KEY]
    try:
        parsed = parse_rerank_request(await read_json_object(request), state.config)
    except ApiError as error:
        return error.response()
    return _rerank_response(state, parsed)


async def _tokenize(request: web.Request) -> web.Response:
    state = request.app[POOLING_KEY]
    try:
        parsed = parse_tokenize_request(await read_json_object(request), state.config)
    except ApiError as error:
        return error.response()
    tokens = state.tokenizer.encode(parsed.text, parsed.add_special_tokens)
    token_strs = state.tokenizer.token_strs(tokens) if parsed.return_token_strs else None
    return _json({"count": len(tokens), "max_model_len": state.config.max_model_len,
                  "tokens": tokens, "token_strs": token_strs})


async def _detokenize(request: web.Request) -> web.Response:
    state = request.app[POOLING_KEY]
    try:
        tokens = parse_detokenize_request(await read_json_object(request), state.config)
    except ApiError as error:
        return error.response()
    return _json({"prompt": state.tokenizer.decode(tokens)})


@web.middleware
async def _fastapi_route_errors(request: web.Request, handler) -> web.StreamResponse:
    """A missing route or method as FastAPI (vLLM's server) answers it, not as aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed as refusal:
        return web.json_response({"detail": "Method Not Allowed"}, status=405,
                                 headers={"Allow": ", ".join(sorted(refusal.allowed_methods))})


def register_pooling_routes(app: web.Application, config: SimConfig) -> None:
    """The tokenizer routes (both runners) and, under `--runner pooling`, the pooling routes."""
    app[POOLING_KEY] = PoolingState(config)
    app.middlewares.append(_fastapi_route_errors)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    if config.runner != POOLING_RUNNER:
        return
    app.router.add_post("/v1/embeddings", _embeddings)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, _score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, _rerank)
