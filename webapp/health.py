"""`/healthz`: is this web worker up, and can it reach Redis. No auth, no secrets."""

from __future__ import annotations

import redis
from flask import Blueprint

from webapp.apidoc import documented
from webapp.context import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented("Is this web worker up, and can it reach Redis",
            responses={503: "Redis is unreachable."})
def healthz():
    try:
        services().redis.ping()
    except redis.RedisError:
        return {"status": "degraded", "redis": "unreachable"}, 503
    return {"status": "ok", "redis": "ok"}
