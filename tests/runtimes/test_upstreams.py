"""Upstream engines (run by others): the record the router hands out for one, the path and
header the engine client sends it, and the health check, against real HTTP servers."""

from __future__ import annotations

import pytest

from runtimes.catalog import ModelCatalog
from runtimes.registry import RuntimeRegistry
from runtimes.routing import RuntimeRouter
from runtimes.upstream import upstream_headers, upstream_path
from runtimes.upstreams import check_all, upstream_record
from tests.harness import free_port
from tests.runtimes.test_sim import launch, stop


@pytest.mark.parametrize(("base", "path", "sent"), [
    ("/v1", "/v1/chat/completions", "/v1/chat/completions"),
    ("/team-b/v1", "/v1/completions", "/team-b/v1/completions"),
    ("/team-b/v1/", "/v1/models", "/team-b/v1/models"),
    ("/team-b/v1", "/tokenize", "/team-b/tokenize"),
    ("", "/v1/embeddings", "/v1/embeddings"),
])
def test_our_paths_on_an_upstream(base, path, sent):
    assert upstream_path(base, path) == sent


def test_the_record_and_its_key(monkeypatch):
    catalog = ModelCatalog.from_document({"models": [{"id": "far", "upstream": {
        "base_url": "https://api.example.com/v2/v1", "api_key_env": "FAR_KEY"}}]}, "vllm")
    record = upstream_record(catalog.get("far"))
    assert (record.host, record.port, record.backend) == ("api.example.com", 443, "upstream")
    assert record.meta == {"base_path": "/v2/v1", "tls": True, "key_env": "FAR_KEY"}
    assert upstream_headers(record.meta) == b""  # the variable is not set: no header
    monkeypatch.setenv("FAR_KEY", "s3cret")
    assert upstream_headers(record.meta) == b"Authorization: Bearer s3cret\r\n"


def test_health_checks_decide_what_the_router_hands_out(redis_db, tmp_path, monkeypatch):
    sim = launch(tmp_path, "--model", "far", "--api-key", "right")
    sim.wait_until_healthy()
    try:
        dead = free_port()
        catalog = ModelCatalog.from_document({"models": [
            {"id": "far", "upstream": {"base_url": f"http://127.0.0.1:{sim.port}/v1",
                                       "api_key_env": "FAR_KEY"}},
            {"id": "gone", "upstream": {"base_url": f"http://127.0.0.1:{dead}/v1"}}]}, "vllm")
        registry = RuntimeRegistry(redis_db, prefix="t")
        router = RuntimeRouter(registry, cache_seconds=0, catalog=catalog)
        assert {r.model for m in ("far", "gone") for r in router.ready(m)} == {"far", "gone"}
        monkeypatch.setenv("FAR_KEY", "wrong")
        outcomes = check_all(catalog, registry)
        assert outcomes["far"]["ok"] is False and "401" in outcomes["far"]["error"]
        assert outcomes["gone"]["ok"] is False and "unreachable" in outcomes["gone"]["error"]
        assert router.ready("far") == [] and router.ready("gone") == []
        monkeypatch.setenv("FAR_KEY", "right")
        assert check_all(catalog, registry)["far"]["ok"] is True
        assert [r.id for r in router.ready("far")] == ["upstream-far"]
    finally:
        stop(sim)
