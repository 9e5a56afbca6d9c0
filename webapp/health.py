"""`/healthz`: is this web worker up, and can it reach Redis. No auth, no secrets."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    try:
        current_app.extensions["redis"].ping()
    except redis.RedisError:
        return {"status": "degraded", "redis": "unreachable"}, 503
    return {"status": "ok", "redis": "ok"}
