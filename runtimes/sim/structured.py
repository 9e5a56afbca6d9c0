"""Structured output for the sim engine: `response_format` as vLLM enforces it with guided
decoding, made up deterministically.

`{"type": "json_schema", "json_schema": {"schema": ...}}` yields a JSON value that fits the
schema (objects with their properties, `enum`, strings, numbers and integers within `minimum` and
`maximum`, booleans, arrays of one item); `{"type": "json_object"}` yields an object of one word.
The values are drawn from a generator seeded by the prompt, so the same request always gets the
same answer. A schema this stand-in does not understand is a 400, as vLLM refuses a schema its
grammar backend cannot compile.
"""

from __future__ import annotations

import json
import random

from runtimes.sim.textgen import VOCABULARY, Generation, seed_for

# Characters per generated "token" of the JSON text.
_PIECE = 4


class SchemaError(ValueError):
    """A response_format this engine cannot follow."""


def structured_generation(response_format: object, prompt_text: str,
                          max_tokens: int) -> Generation | None:
    """The generation for a chat request's `response_format`; None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise SchemaError("`response_format` must be an object.")
    kind = response_format.get("type")
    rng = random.Random(seed_for(prompt_text))
    if kind == "text":
        return None
    if kind == "json_object":
        value: object = {"answer": rng.choice(VOCABULARY)}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise SchemaError("`response_format.json_schema.schema` must be an object.")
        value = _value(schema, rng)
    else:
        raise SchemaError(f"`response_format.type` {kind!r} is not supported.")
    text = json.dumps(value)
    pieces = [text[i:i + _PIECE] for i in range(0, len(text), _PIECE)]
    if len(pieces) > max_tokens:  # cut short, as a real engine is by max_tokens
        return Generation(pieces=pieces[:max_tokens], finish_reason="length", stop_reason=None)
    return Generation(pieces=pieces, finish_reason="stop", stop_reason=None)


def _value(schema: dict, rng: random.Random) -> object:
    if "enum" in schema:
        choices = schema["enum"]
        if not isinstance(choices, list) or not choices:
            raise SchemaError("`enum` must be a non-empty list.")
        return rng.choice(choices)
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise SchemaError("`properties` must be an object.")
        return {name: _value(sub, rng) for name, sub in properties.items()}
    if kind == "string":
        return rng.choice(VOCABULARY)
    if kind in ("number", "integer"):
        low = schema.get("minimum", 0)
        high = schema.get("maximum", 1 if kind == "number" else 10)
        if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in (low, high)) \
                or low > high:
            raise SchemaError("`minimum` and `maximum` must be numbers, minimum first.")
        if kind == "integer":
            return rng.randint(int(low), int(high))
        return round(rng.uniform(low, high), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [_value(schema.get("items") or {"type": "string"}, rng)]
    raise SchemaError(f"schema type {kind!r} is not supported by the sim engine.")
