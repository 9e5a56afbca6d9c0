"""Token and request budgets of keys and projects, enforced atomically across web workers.

A key (or its project, in the keys file) may set `tokens_per_minute`, `tokens_per_day` and
`requests_per_day`. Before a call is sent, one Lua step checks every budget of the key and its
project against what is used plus the call's estimate (its body's bytes / 4, plus its
`max_tokens`, or `DEFAULT_COMPLETION_ESTIMATE` when it has none) and, if all have room,
reserves the estimate in all of them: concurrent calls cannot overshoot, since each holds its
estimate until it is settled. When the call ends the
reservation is settled to what the engine reported (the estimate given back, the real usage
kept). Over budget is a 429 in the OpenAI shape with `Retry-After` until the window frees (the
next minute, or the next day, UTC).

The windows are Redis counters with an expiry (`jobs.budget_windows`, which batch work adds its
usage to as well); keys without budgets pay nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import redis

from jobs.budget_windows import FIGURES, counter, window_end
from webapp.keystore import ApiKey, Budget

DEFAULT_COMPLETION_ESTIMATE = 512

# KEYS: the counters; ARGV: per counter its limit and amount. Refuse (0, index) at the first
# counter without room; else add every amount and answer 1.
_RESERVE = """
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + tonumber(ARGV[2 * i]) > tonumber(ARGV[2 * i - 1]) then
    return {0, i}
  end
end
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i])
  redis.call('EXPIRE', KEYS[i], ARGV[#KEYS * 2 + i])
end
return {1, 0}
"""


class OverBudget(Exception):
    def __init__(self, budget: Budget, figure: str, limit: int, retry_after: int):
        super().__init__(figure)
        self.budget = budget
        self.figure = figure
        self.limit = limit
        self.retry_after = retry_after


@dataclass
class Reservation:
    """A call's estimate, held in its token counters until `settle`."""

    gate: BudgetGate
    token_counters: list[str]
    estimate: int
    settled: bool = field(default=False)

    def settle(self, used_tokens: int) -> None:
        """Keep what the call used instead of its estimate (once; later calls do nothing)."""
        if self.settled:
            return
        self.settled = True
        change = used_tokens - self.estimate
        if change and self.token_counters:
            pipe = self.gate.redis.pipeline(transaction=False)
            for counter in self.token_counters:
                pipe.incrby(counter, change)
            pipe.execute()


def estimate_tokens(raw: bytes, body: dict) -> int:
    """An upper bound of what a call may use: its body's bytes / 4 (a token is rarely less
    than 4 bytes of JSON), plus what it may generate."""
    most = None
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            most = value if most is None else min(most, value)
    return math.ceil(len(raw) / 4) + (DEFAULT_COMPLETION_ESTIMATE if most is None else most)


class BudgetGate:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._reserve = client.register_script(_RESERVE)

    def reserve(self, key: ApiKey, estimate: int, now: float | None = None) -> Reservation | None:
        """Reserve `estimate` tokens and one request in every budget of `key`; None when it
        has none. Raise OverBudget naming the first budget without room."""
        if not key.budgets:
            return None
        now = time.time() if now is None else now
        counters, limits, ttls, tokens, which = [], [], [], [], []
        for budget in key.budgets:
            for figure, (size, is_tokens) in FIGURES.items():
                limit = getattr(budget, figure)
                if limit is None:
                    continue
                name = counter(budget.scope, budget.name, figure, now)
                counters.append(name)
                limits += [limit, estimate if is_tokens else 1]
                ttls.append(size * 2)
                which.append((budget, figure, limit, window_end(figure, now) - now))
                if is_tokens:
                    tokens.append(name)
        allowed, index = self._reserve(keys=counters, args=limits + ttls)
        if not allowed:
            budget, figure, limit, left = which[int(index) - 1]
            raise OverBudget(budget, figure, limit, max(1, math.ceil(left)))
        return Reservation(self, tokens, estimate)
