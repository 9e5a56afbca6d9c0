"""Log probabilities for the sim engine's made-up tokens, in vLLM's two shapes.

vLLM returns them when asked (`logprobs: k` on completions, `logprobs: true` with
`top_logprobs: k` on chat). The sim has no model, so the numbers are drawn from a generator seeded
by the prompt: stable per request, each sampled token ranked first (as under greedy decoding), its
alternatives from the sim's vocabulary with lower values. The shapes are vLLM's:

- completions: `{"text_offset", "token_logprobs", "tokens", "top_logprobs": [{token: lp}]}`, the
  top dict holding the k best and the sampled token (k + 1 entries when it is not among them,
  which never happens here: it is the best);
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}` with k entries, the sampled token first.
"""

from __future__ import annotations

import random

from runtimes.sim.textgen import _TOKEN_TEXTS, Generation

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


def _ranked(rng: random.Random, piece: str, count: int) -> list[tuple[str, float]]:
    """The sampled piece and `count - 1` alternatives, best first."""
    best = -round(rng.uniform(0.01, 1.5), 6)
    alternatives = [t for t in rng.sample(_TOKEN_TEXTS, min(count + 1, len(_TOKEN_TEXTS)))
                    if t != piece][: max(0, count - 1)]
    ranked = [(piece, best)]
    value = best
    for alternative in alternatives:
        value -= round(rng.uniform(0.1, 2.0), 6)
        ranked.append((alternative, value))
    return ranked


def completion_logprobs(generation: Generation, top: int, seed: int) -> dict:
    rng = random.Random(seed)
    offsets, values, tops, offset = [], [], [], 0
    for piece in generation.pieces:
        ranked = _ranked(rng, piece, max(1, top))
        offsets.append(offset)
        offset += len(piece)
        values.append(ranked[0][1])
        tops.append(dict(ranked[: max(1, top)]) if top else {piece: ranked[0][1]})
    return {"text_offset": offsets, "token_logprobs": values, "tokens": list(generation.pieces),
            "top_logprobs": tops}


def chat_logprobs(generation: Generation, top: int, seed: int) -> dict:
    rng = random.Random(seed)
    content = []
    for piece in generation.pieces:
        ranked = _ranked(rng, piece, max(1, top))
        content.append({
            "token": piece, "logprob": ranked[0][1], "bytes": list(piece.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in ranked[:top]],
        })
    return {"content": content}
