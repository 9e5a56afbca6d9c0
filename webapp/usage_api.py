"""`GET /v1/usage`: prompt and completion tokens by time bucket and by key, model, project or
kind, as JSON or CSV (`?format=csv`).

A `monitor` key sees the usage of every key of its project; any other key its own usage only
(a project never sees another's). The figures are what the engines reported
(`services.usage_ledger`): realtime calls (written with each web worker's usage report, so
within about a second), batch lines and eval samples (once each, however often they ran).
"""

from __future__ import annotations

import csv
import io
import time

from flask import Blueprint, Response, g
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from services.usage_ledger import BUCKETS, DAY, GROUPS, MINUTE_KEEP_SECONDS
from webapp.apidoc import accepts
from webapp.auth import require_scope
from webapp.context import services

bp = Blueprint("usage_api", __name__)

ALL_SCOPES = ("realtime", "batch", "upload", "eval", "monitor")
# The longest range by the minute or the hour: what the minute buckets keep, less a day.
MINUTE_RANGE_SECONDS = MINUTE_KEEP_SECONDS - DAY
DAY_RANGE_SECONDS = 400 * DAY
_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


class UsageQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    start = fields.Integer(metadata={"description": "unix seconds; default: end - 24 h"},
                           validate=validate.Range(min=0, max=2**40))
    end = fields.Integer(metadata={"description": "unix seconds; default: now"},
                         validate=validate.Range(min=0, max=2**40))
    group_by = fields.String(load_default="model", validate=validate.OneOf(GROUPS))
    bucket = fields.String(load_default="hour", validate=validate.OneOf(tuple(BUCKETS)))
    format = fields.String(load_default="json", validate=validate.OneOf(("json", "csv")))

    @validates_schema
    def _range(self, data, **kwargs):
        end = data.get("end")
        end = int(time.time()) if end is None else end
        start = data.get("start", end - DAY)
        if start >= end:
            raise ValidationError("must be before 'end'", field_name="start")
        longest = DAY_RANGE_SECONDS if data.get("bucket") == "day" else MINUTE_RANGE_SECONDS
        if end - start > longest:
            raise ValidationError(f"a range by the {data.get('bucket')} is at most "
                                  f"{longest // DAY} days", field_name="start")


@bp.get("/v1/usage")
@require_scope(*ALL_SCOPES)
@accepts(query=UsageQuery(), summary="Token usage by time and by key, model, project or kind "
                                     "(a monitor key: its project's; else the key's own)")
def usage(args):
    key = g.api_key
    end = args.get("end") or int(time.time())
    start = args.get("start", end - DAY)
    own = None if "monitor" in key.scopes else key.name
    rows = services().usage.query(start, end, args["bucket"], args["group_by"],
                                  project=key.project, key=own)
    if args["format"] == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("start", args["group_by"], *_COLUMNS))
        for row in rows:
            writer.writerow((row["start"], row[args["group_by"]], *(row[c] for c in _COLUMNS)))
        return Response(out.getvalue(), content_type="text/csv; charset=utf-8")
    return {"object": "list", "start": start, "end": end, "bucket": args["bucket"],
            "group_by": args["group_by"], "data": rows}
