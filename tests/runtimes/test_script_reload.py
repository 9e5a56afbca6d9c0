"""Lua scripts after a failover: the new primary's script cache is empty (it is not replicated),
so the first EVALSHA answers NOSCRIPT. redis-py's `Script` loads the script again; no code of
ours keeps a SHA of its own that would go stale."""

from __future__ import annotations

import re

from runtimes.leases import LeaseSet
from tests.harness import REPO


def test_a_lease_script_works_again_after_the_script_cache_is_flushed(redis_db):
    leases = LeaseSet(redis_db, "test:reload")
    assert leases.acquire("engine", 2)
    redis_db.script_flush()  # what a promoted replica looks like to the script cache
    assert not redis_db.script_exists(leases._acquire.sha)[0]
    assert leases.acquire("engine", 2)
    assert leases.acquire("engine", 2) is None  # and it still counts: the limit holds
    assert redis_db.script_exists(leases._acquire.sha)[0]


def test_no_code_calls_evalsha_or_loads_scripts_itself():
    pattern = re.compile(r"\.(evalsha|script_load)\(|\bEVALSHA\b")
    offenders = [str(path.relative_to(REPO))
                 for package in ("config", "runtimes", "jobs", "services", "tasks", "webapp")
                 for path in (REPO / package).rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
