"""OpenAI-style list paging (`after`, `limit`) shared by the list endpoints."""

from __future__ import annotations

from flask import request

from webapp.errors import APIError


def page_args(default: int = 20, maximum: int = 100) -> tuple[str | None, int]:
    raw = request.args.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        raise APIError(400, "'limit' must be an integer.", code="invalid_value",
                       param="limit") from None
    if not 1 <= limit <= maximum:
        raise APIError(400, f"'limit' must be between 1 and {maximum}.", code="invalid_value",
                       param="limit")
    return request.args.get("after") or None, limit


def page(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
