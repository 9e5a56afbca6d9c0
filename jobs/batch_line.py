"""One line of a batch input file, checked by a marshmallow schema before the batch runs.

The schema checks the line's outline (`custom_id`, `method`, `url`, `body`); what needs state
(duplicate ids, the catalog, the key's allowlist) and the body itself (the engine request's own
schema, injected) are checked by the batch's validation. Each problem gets OpenAI's code for it.
"""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from jobs import json_limits

# A field's problem → the code OpenAI's batch validation reports for it.
_CODES = {"custom_id": "missing_custom_id", "method": "invalid_method", "url": "invalid_url",
          "body": "invalid_body"}


class BatchLine(Schema):
    class Meta:
        unknown = EXCLUDE

    custom_id = fields.String(required=True, validate=validate.Length(min=1, max=512))
    method = fields.String(load_default="POST", validate=validate.Equal("POST"))
    url = fields.String(required=True)
    body = fields.Dict(required=True)


_LINE = BatchLine()


class LineProblem(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def parse_line(raw: bytes, endpoint: str) -> dict:
    """The checked line; LineProblem (with its code and the field) otherwise."""
    try:
        line = json_limits.loads(raw)
    except json_limits.TooDeep as exc:
        raise LineProblem("invalid_json", f"the line {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise LineProblem("invalid_json", "the line is not valid JSON") from None
    if not isinstance(line, dict):
        raise LineProblem("invalid_request", "the line must be a JSON object")
    try:
        checked = _LINE.load(line)
    except ValidationError as exc:
        field = sorted(exc.messages)[0]
        message = exc.messages[field]
        text = message[0] if isinstance(message, list) else str(message)
        raise LineProblem(_CODES.get(field, "invalid_request"), f"{field}: {text}",
                          field) from None
    if checked["url"] != endpoint:
        raise LineProblem("invalid_url", f"url must be the batch's endpoint {endpoint}", "url")
    return checked
