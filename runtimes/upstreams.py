"""Engines the orchestrator does not run: a catalog entry's `upstream` (another team's vLLM, a
hosted OpenAI-compatible API).

Such a model is served like a managed one (auth, limits, usage, streaming, batch lines) but is
never started or stopped: it has no instance in the registry. The router hands out one fixed
record for it (`upstream_record`: backend `upstream`, the base URL's host and port, and in
`meta` its path, TLS and the environment variable holding its API key, which the engine client
reads: the key itself is never stored), while its last health check passed. The control
worker checks every upstream on each autoscaler tick (`check_all`: `GET <base_url>/models`
with the key, a short timeout) and keeps the outcome in the registry's `upstreams` hash, which
the router and the dashboard read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import urlsplit

import urllib3

from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.registry import FAILED, READY, RuntimeRecord, RuntimeRegistry

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 3.0
_pool = urllib3.PoolManager(num_pools=16, maxsize=2, retries=False)


def upstream_record(spec: ModelSpec, healthy: bool = True) -> RuntimeRecord:
    parts = urlsplit(spec.upstream_url)
    tls = parts.scheme == "https"
    return RuntimeRecord(
        id=f"upstream-{spec.id}", model=spec.id, engine="upstream", backend="upstream",
        state=READY if healthy else FAILED, host=parts.hostname or "",
        port=parts.port or (443 if tls else 80),
        meta={"base_path": parts.path or "", "tls": tls, "key_env": spec.upstream_key_env})


def check(spec: ModelSpec) -> tuple[bool, str]:
    """Whether the upstream answers its model list (with its key) now; and why not."""
    headers = {}
    token = os.environ.get(spec.upstream_key_env or "", "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = spec.upstream_url.rstrip("/") + "/models"
    try:
        answer = _pool.request("GET", url, headers=headers, timeout=CHECK_TIMEOUT_SECONDS)
    except urllib3.exceptions.HTTPError as exc:
        return False, f"unreachable: {type(exc).__name__}"
    if answer.status != 200:
        return False, f"GET /models answered {answer.status}"
    return True, ""


def check_all(catalog: ModelCatalog, registry: RuntimeRegistry) -> dict[str, dict]:
    """Check every upstream of the catalog; keep and return the outcomes by model."""
    outcomes = {}
    for spec in catalog:
        if spec.upstream_url is None:
            continue
        ok, error = check(spec)
        outcomes[spec.id] = {"ok": ok, "error": error, "at": round(time.time(), 3)}
        if not ok:
            log.warning("upstream of %s is not healthy: %s", spec.id, error)
    if outcomes:
        registry.redis.hset(registry.key("upstreams"),
                            mapping={m: json.dumps(o) for m, o in outcomes.items()})
    return outcomes


def health(registry: RuntimeRegistry) -> dict[str, dict]:
    """The last check of each upstream, by model (none yet: not in the answer)."""
    raw = registry.redis.hgetall(registry.key("upstreams"))
    return {k.decode(): json.loads(v) for k, v in raw.items()}
