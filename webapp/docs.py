"""`GET /openapi.json` (public): the API's OpenAPI document, made from the code (webapp.apidoc)."""

from __future__ import annotations

from flask import Blueprint, current_app

from webapp.apidoc import build_openapi, documented

bp = Blueprint("docs", __name__)


@bp.get("/openapi.json")
@documented("This document")
def openapi():
    # Built once per worker: the routes do not change while the app runs.
    if "openapi" not in current_app.extensions:
        current_app.extensions["openapi"] = build_openapi(current_app)
    return current_app.extensions["openapi"]
