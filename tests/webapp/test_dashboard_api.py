"""The dashboard page and its data API on the real stack; request ids; no token in any log."""

from __future__ import annotations

import re
import socket
import time

import urllib3

from tests.conftest import TOKENS, warm
from tests.harness import REPO, wait_for

BROKEN = "sim/dashboard-broken"


def get(stack, path: str, token: str | None = "monitor", headers: dict | None = None):
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {TOKENS.get(token, token)}"
    return urllib3.request("GET", f"{stack.base_url}{path}", headers=all_headers, timeout=10,
                           retries=False)


def post(stack, path: str, token: str | None = "monitor", headers: dict | None = None):
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {TOKENS.get(token, token)}"
    return urllib3.request("POST", f"{stack.base_url}{path}", headers=all_headers, timeout=10,
                           retries=False)


def test_page_is_public_and_serves_its_own_assets(stack):
    page = get(stack, "/dashboard", token=None)
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    html = page.data.decode()
    for asset in ("/static/dashboard.js", "/static/dashboard.css",
                  "/static/vendor/chart.umd.min.js"):
        assert asset in html
        assert get(stack, asset, token=None).status == 200
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from another host
    assert (REPO / "webapp/static/vendor/chart.js.LICENSE.md").is_file()


def test_data_api_needs_monitor_as_bearer_or_query_key(stack):
    missing = get(stack, "/ui/api/overview", token=None)
    assert missing.status == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = get(stack, "/ui/api/overview", token="not-a-token")
    assert wrong.status == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    scope = get(stack, "/ui/api/overview", token="realtime")
    assert scope.status == 403
    assert scope.json()["error"]["code"] == "insufficient_scope"
    assert get(stack, f"/ui/api/overview?key={TOKENS['realtime']}", token=None).status == 403
    assert get(stack, f"/ui/api/overview?key={TOKENS['monitor']}", token=None).status == 200
    assert get(stack, "/ui/api/overview").status == 200


def test_overview_shows_a_ready_runtime_and_the_queues(stack):
    warm(stack, "sim/fast")
    data = get(stack, "/ui/api/overview").json()
    assert set(data) >= {"now", "gpus", "runtimes", "models", "queues", "jobs", "downloads",
                         "decisions", "web_workers", "flower"}
    [runtime] = [r for r in data["runtimes"] if r["model"] == "sim/fast"]
    assert runtime["state"] == "ready" and runtime["engine"] == "sim"
    assert runtime["uptime_seconds"] >= 0 and runtime["idle_seconds"] >= 0
    assert runtime["inflight"] == 0
    assert data["gpus"] == []  # the test stack manages no GPUs
    assert set(data["queues"]["batch_by_priority"]) == {str(p) for p in range(10)}
    assert set(data["queues"]["messages"]) == {"batch", "control", "downloads"}
    assert data["web_workers"] == 2
    assert data["flower"] == {"url": None, "port": 5555}
    models = {m["id"]: m for m in data["models"]}
    assert models["sim/fast"]["ready"] == 1


def test_series_has_an_hour_of_buckets(stack):
    assert get(stack, "/ui/api/series?minutes=0").status == 400
    assert get(stack, "/ui/api/series?minutes=abc").status == 400
    series = get(stack, "/ui/api/series?minutes=60").json()
    assert len(series["t"]) == 360 and series["bucket_seconds"] == 10
    warm(stack, "sim/fast")

    def counted():
        rps = get(stack, "/ui/api/series?minutes=2").json()["rps"].get("sim/fast", [])
        return any(v > 0 for v in rps)

    wait_for(counted, 10, interval=0.3, what="calls in the chart series")


def test_reset_of_a_failed_model(stack, registry):
    for _ in range(3):
        registry.note_failed_start(BROKEN, {"instance": None, "exit_code": 2,
                                            "reason": "engine exited with code 2 while starting",
                                            "last_logs": "line 1\nsimulated start failure",
                                            "at": time.time()})
    model = next(m for m in get(stack, "/ui/api/overview").json()["models"] if m["id"] == BROKEN)
    assert model["failed"] and model["failed_starts"] >= 3
    assert model["last_failure"]["exit_code"] == 2
    assert "simulated start failure" in model["last_failure"]["last_logs"]

    path = f"/ui/api/models/{BROKEN}/reset"
    assert post(stack, path, token="realtime").status == 403
    assert post(stack, "/ui/api/models/no/such/reset").status == 404
    reset = post(stack, path, headers={"X-Request-Id": "rid-reset-check-42"})
    assert reset.status == 200, reset.data
    assert reset.headers["X-Request-Id"] == "rid-reset-check-42"
    assert reset.json() == {"model": BROKEN, "reset": True,
                            "failed_starts_before": model["failed_starts"]}
    assert registry.failed_starts().get(BROKEN, 0) < 3
    assert any(d["action"] == "reset" and d["model"] == BROKEN and "test-monitor" in d["reason"]
               for d in registry.recent_decisions(50))
    # The log line written while handling it carries the request id.
    wait_for(lambda: re.search(r"rid=rid-reset-check-42: model sim/dashboard-broken reset",
                               stack.log_path("web").read_text()), 5, what="the reset log line")


def test_every_answer_carries_a_request_id(stack):
    for path, token in (("/healthz", None), ("/v1/models", "realtime"), ("/nope", None),
                        ("/ui/api/overview", None), ("/dashboard", None)):
        generated = get(stack, path, token=token)
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-Id"]), path
        kept = get(stack, path, token=token, headers={"X-Request-Id": "trace-77"})
        assert kept.headers["X-Request-Id"] == "trace-77", path
    # One made up when the caller's is unusable.
    long = get(stack, "/healthz", token=None, headers={"X-Request-Id": "x" * 500})
    assert len(long.headers["X-Request-Id"]) == 32


def test_query_key_never_reaches_a_log(stack):
    secret = TOKENS["monitor"]
    assert get(stack, f"/ui/api/overview?key={secret}", token=None).status == 200
    assert get(stack, f"/dashboard?key={secret}", token=None).status == 200
    # A request gunicorn cannot parse is logged with its request line: the query must go.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(f"GET /ui/api/overview?key={secret}&\x01 HTTP/1.1\r\n\r\n".encode())
        sock.recv(4096)
    wait_for(lambda: "'GET /ui/api/overview?[query removed] HTTP/1.1'"
             in stack.log_path("web").read_text(), 5, what="gunicorn's warning, query cut")
    time.sleep(0.5)
    for name in ("web", "worker", "batch"):
        assert secret not in stack.log_path(name).read_text(), name
