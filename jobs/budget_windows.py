"""The budget windows of keys and projects in Redis, shared by realtime calls and batch work.

A budget (`tokens_per_minute`, `tokens_per_day`, `requests_per_day` of a key or a project) is
counted in one Redis counter per window: `budget:<scope>:<name>:<figure>:<window>`, kept two
windows long. The web app reserves and settles realtime calls in them (`webapp.budgets`); batch
work, which has no keys file, carries its owner's daily budgets on the job (`budgets`, set when
the job is made) and adds each stored line's usage to the same day counters, so realtime calls
and batch lines share one day. A job whose owner is over a daily budget waits (`over_daily`)
rather than fail.
"""

from __future__ import annotations

import time

import redis

MINUTE, DAY = 60, 86400
PREFIX = "budget"
# figure -> (window seconds, counts tokens)
FIGURES = {"tokens_per_minute": (MINUTE, True), "tokens_per_day": (DAY, True),
           "requests_per_day": (DAY, False)}
DAILY = ("tokens_per_day", "requests_per_day")


def counter(scope: str, name: str, figure: str, now: float) -> str:
    size = FIGURES[figure][0]
    return f"{PREFIX}:{scope}:{name}:{figure}:{int(now // size)}"


def window_end(figure: str, now: float) -> float:
    size = FIGURES[figure][0]
    return (int(now // size) + 1) * size


def daily_budgets(budgets) -> list[dict]:
    """What a job carries of its owner's budgets (`webapp.keystore.Budget`s): the daily ones."""
    carried = []
    for budget in budgets:
        limits = {f: getattr(budget, f) for f in DAILY if getattr(budget, f) is not None}
        if limits:
            carried.append({"scope": budget.scope, "name": budget.name, **limits})
    return carried


def over_daily(client: redis.Redis, budgets: list[dict], now: float | None = None) -> str | None:
    """Why a job of an owner with these daily budgets must wait now (None: it need not)."""
    if not budgets:
        return None
    now = time.time() if now is None else now
    checks = [(b, f) for b in budgets for f in DAILY if b.get(f)]
    values = client.mget([counter(b["scope"], b["name"], f, now) for b, f in checks])
    for (budget, figure), value in zip(checks, values, strict=True):
        if int(value or 0) >= budget[figure]:
            whose = "the key's" if budget["scope"] == "key" else f"project {budget['name']}'s"
            return (f"waiting for {whose} {figure} budget of {budget[figure]} (used up today; "
                    f"the day ends at {int(window_end(figure, now))} UTC seconds)")
    return None


def charge_daily(client: redis.Redis, budgets: list[dict], tokens: int, requests: int,
                 now: float | None = None) -> None:
    """Add stored batch work to the owner's day counters."""
    if not budgets or not (tokens or requests):
        return
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    for budget in budgets:
        for figure, amount in (("tokens_per_day", tokens), ("requests_per_day", requests)):
            if budget.get(figure) and amount:
                key = counter(budget["scope"], budget["name"], figure, now)
                pipe.incrby(key, amount)
                pipe.expire(key, 2 * DAY)
    pipe.execute()
