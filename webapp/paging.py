"""OpenAI-style list pages (`object: list`, `data`, `first_id`, `last_id`, `has_more`).

The paging arguments themselves (`after`, `limit`) are checked by `webapp.apidoc.PageQuery`.
"""

from __future__ import annotations

from webapp.errors import APIError


def unknown_cursor() -> APIError:
    """The answer to an `after` that is not an id of the list (so no page silently restarts)."""
    return APIError(400, "'after' is not the id of an item of this list.", code="invalid_value",
                    param="after")


def page(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
