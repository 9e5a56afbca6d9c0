"""The marshmallow schemas of the API's own routes: bodies, query strings and forms.

They check every field's type before a view uses it (a string where a number belongs is a 400,
never coerced: `"priority": "5"` is refused as OpenAI refuses it) and are what `/openapi.json`
describes (`webapp.apidoc`). The realtime bodies, which are relayed to the engine untouched, are
`runtimes.engine_requests`. Definitions of evals are checked here for their outline (types of the
top-level fields); graders and templates need the catalog and are checked by
`jobs.eval_definitions`.
"""

from __future__ import annotations

from marshmallow import (
    EXCLUDE,
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from jobs.evals import RUN_STATUSES
from jobs.lifecycle import ENDPOINTS, WINDOWS
from runtimes.engine_requests import (
    MAX_TOKENS_LIMIT,
    SamplingRequest,
    check_messages,
    check_prompt,
)
from webapp.apidoc import PageQuery

PURPOSES = ("batch", "evals", "user_data")
LISTED_PURPOSES = (*PURPOSES, "batch_output")


def _metadata_field() -> fields.Dict:
    """OpenAI's `metadata`: at most 16 string pairs, keys up to 64 and values up to 512."""
    return fields.Dict(
        keys=fields.String(validate=validate.Length(max=64)),
        values=fields.String(validate=validate.Length(max=512)),
        allow_none=True, validate=validate.Length(max=16),
    )


def _priority_field() -> fields.Integer:
    return fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=0, max=9),
                          metadata={"description": "0-9, larger runs sooner (default 0)"})


class _WithPriority(Schema):
    """`priority` in the body, else `metadata.priority` (a digit, as metadata values are
    strings), else 0."""

    @post_load
    def _priority(self, data, **_):
        priority = data.get("priority")
        if priority is None:
            text = (data.get("metadata") or {}).get("priority")
            if text is not None and (len(text) != 1 or not text.isdigit()):
                raise ValidationError("must be a digit from 0 to 9", "metadata.priority")
            priority = int(text) if text is not None else 0
        data["priority"] = priority
        return data


# -- files ----------------------------------------------------------------------------------

class FileUpload(Schema):
    class Meta:
        unknown = EXCLUDE

    purpose = fields.String(required=True, validate=validate.OneOf(PURPOSES))
    # Read by the view from the multipart body (streamed to disk); here for the document.
    file = fields.Raw(metadata={"type": "string", "format": "binary"})


class FileList(PageQuery):
    purpose = fields.String(validate=validate.OneOf(LISTED_PURPOSES))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=10_000))


# -- batches --------------------------------------------------------------------------------

class BatchCreate(_WithPriority):
    class Meta:
        unknown = EXCLUDE  # OpenAI fields we do not use (e.g. output_expires_after)

    input_file_id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    endpoint = fields.String(required=True, validate=validate.OneOf(ENDPOINTS))
    completion_window = fields.String(required=True, validate=validate.OneOf(list(WINDOWS)))
    metadata = _metadata_field()
    priority = _priority_field()


class BatchCompletionCreate(SamplingRequest):
    """A completions body (`prompt`) or a chat body (`messages`), plus `priority`; every other
    field goes to the engine as given."""

    class Meta:
        unknown = INCLUDE

    prompt = fields.Raw(validate=check_prompt, metadata={"description": "completions"})
    messages = fields.Raw(validate=check_messages, metadata={"description": "chat"})
    max_completion_tokens = fields.Integer(
        allow_none=True, validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT), strict=True)
    priority = fields.Integer(strict=True, load_default=0, validate=validate.Range(min=0, max=9))

    @validates_schema
    def _one_kind(self, data, **_):
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("give either 'prompt' (completions) or 'messages' (chat)",
                                  "prompt")
        if data.get("stream"):
            raise ValidationError("a batch completion cannot stream", "stream")


# -- evals ----------------------------------------------------------------------------------

class EvalCreate(Schema):
    class Meta:
        unknown = INCLUDE

    name = fields.String(allow_none=True, validate=validate.Length(max=256))
    metadata = _metadata_field()
    data_source_config = fields.Dict(required=True)
    testing_criteria = fields.List(fields.Dict(), required=True,
                                   validate=validate.Length(min=1, max=64))


class EvalUpdate(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String(validate=validate.Length(max=256))
    metadata = _metadata_field()


class RunCreate(_WithPriority):
    class Meta:
        unknown = INCLUDE

    name = fields.String(allow_none=True, validate=validate.Length(max=256))
    metadata = _metadata_field()
    data_source = fields.Dict(required=True)
    priority = _priority_field()


class OrderedPage(PageQuery):
    order = fields.String(load_default="asc", validate=validate.OneOf(("asc", "desc")))


class RunList(OrderedPage):
    status = fields.String(validate=validate.OneOf(RUN_STATUSES))


class OutputItemList(OrderedPage):
    status = fields.String(validate=validate.OneOf(("pass", "fail", "error")))


# -- dashboard ------------------------------------------------------------------------------

class SeriesQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    minutes = fields.Integer(load_default=60, validate=validate.Range(min=1, max=120))
