"""Deterministic stand-in for a language model's output.

The sim engine has no model, so it makes text up: the words are picked from a small fixed
vocabulary with a random generator seeded from the sha256 of the prompt. The same prompt therefore
always yields the same words, and a shorter `max_tokens` yields a prefix of a longer one, which
lets tests compare streaming and non-streaming answers and lets benchmarks be repeatable.

A "token" here is one vocabulary word with its leading space; prompts are measured in
whitespace-separated words. Both are rough, but stable, stand-ins for a real tokenizer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

VOCABULARY: tuple[str, ...] = tuple(
    """
    the a model engine token request stream server answer quick brown fox jumps over lazy dog
    cache batch queue latency gateway simulated text of and to in is for with on that this river
    mountain signal window garden pixel orbit harbor lantern meadow copper silver thunder echo
    vector kernel prompt
    """.split()
)

# Each generated token is one word with a leading space, the way BPE vocabularies store words.
_TOKEN_TEXTS: tuple[str, ...] = tuple(" " + word for word in VOCABULARY)


@dataclass(slots=True)
class Generation:
    """What the simulated model produced for one prompt.

    `pieces` holds the text of each generated token in order; streaming sends one piece per
    event, so joining them always equals the non-streamed text. When a stop string cut the
    output, the pieces are clipped so the stop string itself is not part of the text (vLLM's
    default), and trailing pieces may be empty.
    """

    pieces: list[str]
    finish_reason: str  # "length" or "stop"
    stop_reason: str | None  # the stop string that matched, as vLLM reports it

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def token_count(self) -> int:
        return len(self.pieces)


def count_prompt_tokens(prompt_text: str) -> int:
    """Rough prompt length: whitespace-separated words, at least 1 (as no real prompt is empty
    once a tokenizer adds its begin-of-sequence token)."""
    return max(1, len(prompt_text.split()))


def render_chat_prompt(messages: list[dict]) -> str:
    """Flatten chat messages into the single text the simulated model 'reads'.

    Stands in for a chat template: the role is part of the text so that the same words said by a
    different role give a different answer, as they would with a real model.
    """
    lines = []
    for message in messages:
        lines.append(f"{message.get('role', '')}: {_message_text(message.get('content'))}")
    return "\n".join(lines)


def _message_text(content: object) -> str:
    # OpenAI allows content as a string, null, or a list of typed parts; only text parts carry
    # words the simulated model can count.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@lru_cache(maxsize=4096)
def _token_texts(seed: int, count: int) -> tuple[str, ...]:
    # Cached because benchmarks send the same prompts again and again; keyed by the seed rather
    # than the prompt so the cache does not pin large prompt strings in memory.
    return tuple(random.Random(seed).choices(_TOKEN_TEXTS, k=count))


def seed_for(prompt_text: str) -> int:
    digest = hashlib.sha256(prompt_text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def generate(prompt_text: str, max_tokens: int, stop: list[str] | None = None) -> Generation:
    """Produce up to `max_tokens` tokens for `prompt_text`, ending early at a stop string."""
    token_texts = _token_texts(seed_for(prompt_text), max_tokens)
    if stop:
        stopped = _cut_at_stop(token_texts, stop)
        if stopped is not None:
            return stopped
    return Generation(pieces=list(token_texts), finish_reason="length", stop_reason=None)


def _cut_at_stop(token_texts: tuple[str, ...], stop: list[str]) -> Generation | None:
    """Return the generation cut before the first stop string, or None if none occurs."""
    longest_stop = max(len(s) for s in stop)
    text = ""
    for index, token_text in enumerate(token_texts):
        # Only the tail can hold a match that was not already there a token ago.
        search_from = max(0, len(text) - longest_stop + 1)
        text += token_text
        match_at, matched = _first_match(text, stop, search_from)
        if matched is None:
            continue
        # The match may begin inside an earlier token, so clip every piece to the kept text.
        pieces: list[str] = []
        remaining = match_at
        for kept_text in token_texts[: index + 1]:
            pieces.append(kept_text[:remaining])
            remaining = max(0, remaining - len(kept_text))
        return Generation(pieces=pieces, finish_reason="stop", stop_reason=matched)
    return None


def _first_match(text: str, stop: list[str], search_from: int) -> tuple[int, str | None]:
    best_at, best = len(text), None
    for candidate in stop:
        found = text.find(candidate, search_from)
        if found != -1 and found < best_at:
            best_at, best = found, candidate
    return best_at, best
