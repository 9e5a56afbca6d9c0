"""The realtime bodies' 400: the first bad field of an engine request, in the OpenAI shape."""

from __future__ import annotations

import json

from marshmallow import Schema

from webapp.errors import APIError


def validate_body(schema: Schema, body: dict) -> None:
    """Raise a 400 naming the first bad field."""
    errors = schema.validate(body)
    if errors:
        field, messages = next(iter(sorted(errors.items())))
        message = messages[0] if isinstance(messages, list) else json.dumps(messages)
        raise APIError(400, f"'{field}': {message}", code="invalid_value", param=field)
