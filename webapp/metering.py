"""A realtime call's token usage, read from the engine's answer as it is relayed.

A whole answer carries `usage` at its end (`services.usage_ledger.usage_in`). A stream of
completions or chat carries it only when the call asked for it (`stream_options.include_usage`):
when the caller did not, the gateway asks for it (`ask_for_usage`) and takes vLLM's extra last
event (`"choices":[]` with the usage) out of what it relays, so the caller's stream is the one it
would have had. A stream of Responses or Anthropic Messages always carries its usage (in
`response.completed`; in `message_start` and `message_delta`). What was used is added to the
web worker's usage report (`webapp.usage.UsageTracker.count`), which writes it with the rest
about once a second: no Redis round trip per call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from services.usage_ledger import UsageKey, usage_in
from webapp.usage import UsageTracker

# The routes whose streams carry usage only when asked (OpenAI's stream_options).
USAGE_OPTION_PATHS = ("/v1/completions", "/v1/chat/completions")
_USAGE = b'"usage"'
_NO_CHOICES = b'"choices":[]'
_decoder = json.JSONDecoder()


def ask_for_usage(body: dict) -> bool:
    """Make a streamed body ask for its usage; True when the caller had not (the gateway then
    strips that event from the stream)."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                              "include_usage": True}
    return True


class Meter:
    def __init__(self, tracker: UsageTracker, usage_key: UsageKey, strip: bool,
                 on_done: Callable[[int], None] | None = None):
        self.tracker = tracker
        self.usage_key = usage_key
        self.strip = strip
        self.on_done = on_done  # told the tokens used (a budget reservation's settlement)
        self.prompt: int | None = None
        self.completion: int | None = None

    def whole(self, data: bytes) -> None:
        prompt, completion = usage_in(data) or (0, 0)
        self._done(prompt, completion)

    def stream(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Relay `chunks`, noting the usage they carry (and taking out the usage event the
        gateway asked for); the call is counted when the stream ends, however it ends."""
        try:
            for chunk in chunks:
                if _USAGE in chunk:
                    chunk = self._read(chunk)
                yield chunk
        finally:
            self._done(self.prompt or 0, self.completion or 0)

    def _done(self, prompt: int, completion: int) -> None:
        self.tracker.count(self.usage_key, prompt, completion)
        if self.on_done is not None:
            self.on_done(prompt + completion)

    def _read(self, chunk: bytes) -> bytes:
        events = chunk.split(b"\n\n")
        kept = []
        last = len(events) - 1
        for index, event in enumerate(events):
            if _USAGE in event:
                self._note(event)
                # The usage event the caller did not ask for, when whole in this chunk (an
                # event cut by the chunk's end is relayed as it is).
                if self.strip and _NO_CHOICES in event and index < last:
                    continue
            kept.append(event)
        return b"\n\n".join(kept) if len(kept) != len(events) else chunk

    def _note(self, event: bytes) -> None:
        start = event.find(b"{")
        if start < 0:
            return
        try:
            parsed, _ = _decoder.raw_decode(event[start:].decode(errors="replace"))
        except ValueError:
            return
        usage = _usage_of_event(parsed)
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int) and prompt > 0:
            self.prompt = prompt
        if isinstance(completion, int):
            self.completion = max(completion, self.completion or 0)


def _usage_of_event(parsed) -> dict | None:
    """The usage an event carries: its own (completions, chat, message_delta), its response's
    (Responses' response.completed) or its message's (message_start)."""
    if not isinstance(parsed, dict):
        return None
    if isinstance(parsed.get("usage"), dict):
        return parsed["usage"]
    for holder in ("response", "message"):
        inner = parsed.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            return inner["usage"]
    return None
