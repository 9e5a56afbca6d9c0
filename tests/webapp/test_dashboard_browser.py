"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, real stack.

Screenshots go to tests/output/ (git-ignored). Playwright's own browser downloads are never used:
Chromium is launched from /usr/bin/chromium (`apt-get install -y chromium`; .ci/run does it).
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import DEAD_UPSTREAM, TOKENS, UPSTREAM_MODEL, raw_post, sdk
from tests.harness import REPO, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
OUTPUT = REPO / "tests" / "output"
MODEL = "sim/dashboard"  # loads in 4 s; 2 calls at once, 300 ms each
BROKEN = "sim/dashboard-broken"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: apt-get install -y chromium")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, width: int = 1280, height: int = 800):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    # Which address a "Failed to load resource" was about (the console message does not say).
    page.on("response", lambda r: r.status >= 400 and page.errors.append(f"{r.status} {r.url}"))
    return context, page


@pytest.fixture
def page(browser):
    context, page = open_page(browser)
    yield page
    context.close()


def shot(page, name: str, full_page: bool = False) -> None:
    page.screenshot(path=str(OUTPUT / name), full_page=full_page)


def test_without_a_token_the_page_asks_for_one(stack, page):
    page.goto(f"{stack.base_url}/dashboard")
    message = page.locator("#auth-message")
    expect(message).to_contain_text("needs an API token with the “monitor” scope")
    expect(page.locator("#token-input")).to_be_visible()
    expect(page.locator("#board")).to_be_hidden()
    shot(page, "dashboard-no-token.png")


def test_a_key_without_monitor_and_a_wrong_key_are_told_plainly(stack, page):
    page.goto(f"{stack.base_url}/dashboard?key={TOKENS['realtime']}")
    message = page.locator("#auth-message")
    expect(message).to_contain_text("lacks the “monitor” scope")
    assert "key=" not in page.url  # dropped from the address at once
    expect(page.locator("#board")).to_be_hidden()
    shot(page, "dashboard-realtime-key.png")

    page.fill("#token-input", "not-a-real-token")
    page.click("#auth-form button[type=submit]")
    expect(message).to_contain_text("was not accepted: it is not a known API key")

    page.fill("#token-input", TOKENS["monitor"])
    page.click("#auth-form button[type=submit]")
    expect(page.locator("#board")).to_be_visible()
    expect(page.locator("#auth")).to_be_hidden()


def _job_bar(page, job_id: str) -> tuple[float, float] | None:
    bar = page.locator(f'#batches tr[data-job="{job_id}"] progress')
    if bar.count() == 0:
        return None
    return tuple(bar.evaluate("p => [p.value, p.max]"))


def test_a_cold_start_and_a_batch_as_they_happen(stack, registry, page):
    page.goto(f"{stack.base_url}/dashboard?key={TOKENS['monitor']}&refresh=1")
    expect(page.locator("#board")).to_be_visible()
    assert "key=" not in page.url and "refresh=1" in page.url

    # A realtime call for a cold model: 503 for the caller, a starting engine on the page.
    cold = raw_post(stack, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert cold.status == 503
    starting = page.locator(f'#runtimes tr[data-model="{MODEL}"][data-state="starting"]')
    expect(starting).to_be_visible(timeout=10_000)
    expect(starting.locator("td.reason")).to_have_text("cold start")
    eta = page.locator(f'#starting .item[data-model="{MODEL}"]')
    expect(eta).to_contain_text("ready in about")
    expect(eta.locator("progress")).to_be_visible()
    shot(page, "dashboard-starting.png")
    ready = page.locator(f'#runtimes tr[data-model="{MODEL}"][data-state="ready"]')
    expect(ready).to_be_visible(timeout=20_000)
    expect(page.locator(f'#starting .item[data-model="{MODEL}"]')).to_have_count(0)
    for stream in (False, True, False, True):  # for the latency and first-token chart
        answer = raw_post(stack, "/v1/completions",
                          {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": stream})
        assert answer.status == 200

    # A batch of 30 lines: 2 at a time, 300 ms each, so about 4.5 s of progress to watch.
    lines = [{"custom_id": f"dash-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": f"line {i}", "max_tokens": 2}}
             for i in range(30)]
    uploaded = sdk(stack, TOKENS["upload"]).files.create(
        file=("dash.jsonl", io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))),
        purpose="batch")
    batch = sdk(stack, TOKENS["batch"]).batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    row = page.locator(f'#batches tr[data-job="{batch.id}"]')
    expect(row).to_be_visible(timeout=5_000)
    seen: list[tuple[float, float]] = []
    mid_shot = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        bar = _job_bar(page, batch.id)
        if bar is not None and (not seen or bar != seen[-1]):
            seen.append(bar)
            if 0 < bar[0] < bar[1] and not mid_shot:
                shot(page, "dashboard-batch-progress.png")
                mid_shot = True
        if "completed" in row.locator(".badge").inner_text():
            break
        time.sleep(0.1)
    expect(row.locator(".badge")).to_have_text("completed")
    final = _job_bar(page, batch.id)
    assert final == (30, 30), seen
    moving = [value for value, maximum in seen if maximum == 30 and 0 < value < 30]
    assert len(moving) >= 2, f"the bar should move through several values: {seen}"
    assert moving == sorted(moving)
    expect(row).to_contain_text("30 of 30 done")

    # Usage by key and by model, this project's: the batch key's 30 lines, the model's calls.
    by_key = page.locator('#usage-keys tr[data-usage="test-batch"]').first
    expect(by_key).to_be_visible(timeout=10_000)
    expect(by_key.locator("td.num").first).to_have_text(re.compile(r"^([3-9]\d|\d{3,})$"))
    expect(page.locator(f'#usage-models tr[data-usage="{MODEL}"]').first).to_be_visible()

    # The charts: calls and the cold start of the model, from the series in Redis.
    page.wait_for_function(
        """model => {
          const rps = Chart.getChart('chart-rps'), starts = Chart.getChart('chart-starts');
          return rps && starts
            && rps.data.datasets.some(d => d.label === model && d.data.some(v => v > 0))
            && starts.data.datasets.some(d => d.label === model + ' start'
                                              && d.data.some(v => v > 0))
            && Chart.getChart('chart-latency').data.datasets
                 .filter(d => d.data.some(v => v > 0)).length === 4;
        }""", arg=MODEL, timeout=25_000)
    shot(page, "dashboard-1280x800.png")
    shot(page, "dashboard-full.png", full_page=True)
    assert page.errors == []  # no script errors, no blocked resources (CSP), no failed fetch


def test_an_eval_run_is_listed_with_its_grades(stack, page):
    client = sdk(stack, TOKENS["eval"])
    schema = {"type": "object", "properties": {"output": {"type": "string"},
                                               "expected": {"type": "string"}},
              "required": ["output", "expected"]}
    created = client.evals.create(
        name="dashboard eval", data_source_config={"type": "custom", "item_schema": schema},
        testing_criteria=[{"type": "string_check", "name": "same", "operation": "eq",
                           "input": "{{item.output}}", "reference": "{{item.expected}}"}])
    rows = [{"item": {"output": out, "expected": "4"}} for out in ("4", "5", "4")]
    run = client.evals.runs.create(created.id, name="graded on the board", data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": rows}})
    page.goto(f"{stack.base_url}/dashboard?key={TOKENS['monitor']}&refresh=1")
    row = page.locator(f'#eval-runs tr[data-job="{run.id}"]')
    expect(row).to_be_visible(timeout=10_000)
    expect(row.locator(".badge")).to_have_text("completed", timeout=30_000)
    expect(row).to_contain_text("graded on the board")
    expect(row.locator("td.num")).to_have_text("2 / 1")  # passed / failed
    expect(row).to_contain_text("3 of 3 done")
    assert page.errors == []


def test_a_failed_model_shows_its_logs_and_can_be_reset(stack, registry, page):
    page.goto(f"{stack.base_url}/dashboard?key={TOKENS['monitor']}&refresh=1")
    expect(page.locator("#board")).to_be_visible()

    def three_failures():
        # Each call keeps the demand fresh, so the autoscaler retries with backoff.
        raw_post(stack, "/v1/completions", {"model": BROKEN, "prompt": "x", "max_tokens": 1})
        return registry.failed_starts().get(BROKEN, 0) >= 3

    try:
        wait_for(three_failures, 30, interval=0.3, what="three failed starts")
        item = page.locator(f'#failures .item[data-model="{BROKEN}"]')
        expect(item).to_contain_text("failed starts in a row", timeout=5_000)
        expect(item).to_contain_text("exit code 2")
        expect(item.locator("pre.logs")).to_contain_text("fail")
        expect(page.locator("#decisions")).to_contain_text("exited with code 2")
        expect(page.locator("#sum-failed .value")).not_to_have_text("0")
        shot(page, "dashboard-failed.png", full_page=True)

        item.get_by_role("button", name="Reset").click()
        expect(page.locator("#notice")).to_contain_text(f"Reset {BROKEN}")
        expect(page.locator("#decisions")).to_contain_text("reset by an operator")
        assert page.errors == []
    finally:
        # Leave nothing for the autoscaler to retry in the later tests.
        registry.clear_demand(BROKEN)
        registry.reset_model(BROKEN)


def test_upstreams_are_shown_with_their_health(stack, page):
    page.goto(f"{stack.base_url}/dashboard?key={TOKENS['monitor']}&refresh=1")
    expect(page.locator("#board")).to_be_visible()
    alive = page.locator(f'#upstreams .item[data-model="{UPSTREAM_MODEL}"]')
    expect(alive.locator(".badge")).to_have_text("ready", timeout=15_000)
    dead = page.locator(f'#upstreams .item[data-model="{DEAD_UPSTREAM}"]')
    expect(dead.locator(".badge")).to_have_text("failed", timeout=15_000)
    expect(dead.locator(".reason")).to_contain_text("unreachable")
    assert page.errors == []


def test_gpu_holders_and_downloads_are_drawn(stack, page):
    """GPUs and downloads as a GPU box would report them: the one thing this machine lacks.

    The real overview is fetched, then given GPUs, a holder and downloads before the page sees it.
    """
    def with_gpus(route):
        data = route.fetch().json()
        holder = {"id": "rt-gpu0", "model": "org/chat-27b", "engine": "vllm", "state": "ready",
                  "uptime_seconds": 5400, "idle_seconds": 12, "inflight": 3, "sleeping": False}
        data["gpus"] = [{"host": "gpu1", "gpu": 0, "holder": holder},
                        {"host": "gpu1", "gpu": 1, "holder": None}]
        data["downloads"] = [
            {"kind": "download", "model": "org/bulk-7b", "repo_id": "org/bulk-7b",
             "state": "downloading", "done_bytes": 6 * 2**30, "total_bytes": 14 * 2**30,
             "eta_seconds": 95, "rate_bytes_per_second": 90 * 2**20, "error": None,
             "finished_at": None},
            {"kind": "prime", "model": "org/chat-27b", "repo_id": "org/chat-27b",
             "state": "priming", "done_bytes": None, "total_bytes": None, "eta_seconds": None,
             "rate_bytes_per_second": None, "error": None, "finished_at": None},
        ]
        route.fulfill(json=data)

    page.route("**/ui/api/overview", with_gpus)
    page.goto(f"{stack.base_url}/dashboard?key={TOKENS['monitor']}")
    gpu = page.locator('#gpus .gpu[data-model="org/chat-27b"]')
    expect(gpu).to_contain_text("gpu1 · GPU 0")
    expect(gpu).to_contain_text("up 1 h 30 min · idle 12 s · 3 in flight")
    expect(page.locator("#gpus .gpu.free")).to_contain_text("free")
    download = page.locator('#downloads .item[data-kind="download"]')
    expect(download).to_contain_text("6.0 GB of 14.0 GB")
    expect(download).to_contain_text("about 1 min 35 s left")
    assert download.locator("progress").evaluate("p => p.value / p.max") == pytest.approx(6 / 14)
    priming = page.locator('#downloads .item[data-kind="prime"] progress')
    assert priming.evaluate("p => p.position") == -1  # indeterminate: no fraction claimed
    shot(page, "dashboard-gpus-downloads.png")
    assert page.errors == []


def test_readable_on_a_narrow_screen(stack, browser):
    context, page = open_page(browser, 390, 844)
    try:
        page.goto(f"{stack.base_url}/dashboard?key={TOKENS['monitor']}")
        expect(page.locator("#board")).to_be_visible()
        expect(page.locator("#summary .tile").first).to_be_visible()
        page.wait_for_function("() => Chart.getChart('chart-rps') !== undefined")
        # Nothing wider than the screen: tables scroll inside their cards instead.
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, width
        shot(page, "dashboard-narrow.png", full_page=True)
        assert page.errors == []
    finally:
        context.close()
