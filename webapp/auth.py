"""Bearer-token authentication, scopes, model allowlists and per-key limits for the API.

`require_scope("realtime")` guards a view: 401 for a missing or unknown token, 403 for a missing
scope. `check_model_allowed` and `admit` apply a key's model allowlist and limits once the model
is known. The key in force is kept on `flask.g.api_key`; the token itself is never stored or logged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flask import g, request

from webapp.budgets import OverBudget, Reservation, estimate_tokens
from webapp.context import Gateway, gateway
from webapp.errors import APIError
from webapp.keystore import ApiKey
from webapp.limits import LimitExceeded


def _presented_token(allow_query_key: bool, allow_x_api_key: bool = False) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_x_api_key and request.headers.get("x-api-key", "").strip():
        return request.headers["x-api-key"].strip()  # how Anthropic's SDK sends its key
    if allow_query_key:
        return request.args.get("key") or None
    return None


def authenticate(scopes: tuple[str, ...], allow_query_key: bool = False,
                 allow_x_api_key: bool = False) -> ApiKey:
    """The key of this request if it holds one of `scopes`; else the 401 or 403."""
    token = _presented_token(allow_query_key, allow_x_api_key)
    if token is None:
        raise APIError(
            401,
            "Missing API key. Send it as 'Authorization: Bearer <token>'"
            + (" or 'x-api-key: <token>'." if allow_x_api_key else "."),
            code="missing_api_key",
        )
    key = gateway().keystore.lookup(token)
    if key is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    if key.scopes.isdisjoint(scopes):
        needed = " or ".join(f"'{s}'" for s in scopes)
        raise APIError(
            403,
            f"This key lacks the {needed} scope needed for this endpoint.",
            type="permission_error",
            code="insufficient_scope",
        )
    g.api_key = key
    return key


def require_scope(*scopes: str, allow_query_key: bool = False,
                  allow_x_api_key: bool = False) -> Callable:
    """Guard a view: the key must hold at least one of `scopes`. `allow_x_api_key`: the token
    may come as `x-api-key` too (Anthropic's header, on the Messages routes)."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def guarded(*args, **kwargs):
            authenticate(scopes, allow_query_key, allow_x_api_key)
            return view(*args, **kwargs)

        guarded.required_scopes = scopes
        guarded.accepts_x_api_key = allow_x_api_key
        return guarded

    return decorator


def check_model_allowed(key: ApiKey, model: str) -> None:
    if not key.allows_model(model):
        raise APIError(
            403,
            f"This key may not use the model '{model}'.",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )


def admit(key: ApiKey) -> Callable[[], None] | None:
    """Apply the key's limits; return the callable that releases its concurrency lease, if any."""
    if key.requests_per_minute is None and key.max_concurrency is None:
        return None
    limiter = gateway().limiter
    try:
        if key.requests_per_minute is not None:
            limiter.check_rate(key.name, key.requests_per_minute)
        if key.max_concurrency is None:
            return None
        lease = limiter.acquire(key.name, key.max_concurrency)
    except LimitExceeded as exc:
        what = (
            f"{key.requests_per_minute} requests per minute"
            if exc.kind == "requests_per_minute"
            else f"{key.max_concurrency} concurrent requests"
        )
        raise APIError(
            429,
            f"Rate limit reached for this key: {what}.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    released = False

    def release() -> None:
        # Idempotent: both the end of a stream and an error path may call it.
        nonlocal released
        if not released:
            released = True
            limiter.release(key.name, lease)

    return release


def reserve_budget(gw: Gateway, key: ApiKey, raw: bytes, body: dict) -> Reservation | None:
    """Reserve the call's estimate in the key's (and its project's) budgets; the 429 when one
    has no room. None for a key without budgets (no Redis round trip)."""
    if not key.budgets:
        return None
    try:
        return gw.budgets.reserve(key, estimate_tokens(raw, body))
    except OverBudget as exc:
        whose = "this key's" if exc.budget.scope == "key" else f"project {exc.budget.name}'s"
        raise APIError(
            429,
            f"Budget reached: {whose} {exc.figure} of {exc.limit} (this call needs up to "
            f"{estimate_tokens(raw, body)} tokens).",
            type="rate_limit_error",
            code="budget_exceeded",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
