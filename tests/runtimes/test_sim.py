"""End-to-end tests of the sim engine: real `python -m runtimes.sim` processes on loopback, driven
by the official `openai` SDK (and raw HTTP where the SDK hides what vLLM sends on the wire)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "sim-test-model"
# asyncio may wake a timer up to one clock tick early; lower bounds allow for that and no more.
CLOCK_SLACK = 0.02


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class SimProcess:
    proc: subprocess.Popen
    port: int
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        # No retries: a retried 5xx or cut connection would hide exactly what the tests look for.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=15)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_until_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sim exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if http_call("GET", f"{self.url}/health")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.02)
        raise AssertionError(f"sim not healthy after {timeout}s: {self.stderr()}")

    def metrics(self) -> dict[str, float]:
        """Sample name -> value, summed over labels; histogram buckets left out."""
        status, _, body = http_call("GET", f"{self.url}/metrics")
        assert status == 200
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values


def launch(tmp_path: Path, *args: str) -> SimProcess:
    port = free_port()
    stderr_path = tmp_path / f"sim-{port}.stderr"
    with stderr_path.open("w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtimes.sim", "--model", MODEL, "--port", str(port), *args],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
        )
    return SimProcess(proc, port, stderr_path)


def stop(sim: SimProcess) -> None:
    if sim.proc.poll() is None:
        sim.proc.kill()
    sim.proc.wait(timeout=10)


def http_call(method: str, url: str, body: object = None, raw: bytes | None = None):
    """(status, headers, body bytes) of one plain HTTP request, errors included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def start(*args: str, wait: bool = True) -> SimProcess:
        sim = launch(tmp_path, *args)
        started.append(sim)
        if wait:
            sim.wait_until_healthy()
        return sim

    yield start
    for sim in started:
        stop(sim)


@pytest.fixture(scope="module")
def fast_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    sim = launch(tmp_path_factory.mktemp("fast"), "--max-model-len", "256")
    try:
        sim.wait_until_healthy()
        yield sim
    finally:
        stop(sim)


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    sim = launch(
        tmp_path_factory.mktemp("slow"),
        *("--max-concurrency", "2", "--ttft-ms", "200", "--tpot-ms", "40"),
    )
    try:
        sim.wait_until_healthy()
        yield sim
    finally:
        stop(sim)


def complete_text(client: openai.OpenAI, prompt: str, max_tokens: int) -> str:
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
    return result.choices[0].text


# ---------------------------------------------------------------- OpenAI surface


def test_health_and_models_list_the_served_model(fast_sim: SimProcess) -> None:
    status, _, body = http_call("GET", f"{fast_sim.url}/health")
    assert (status, body) == (200, b"")
    assert [m.id for m in fast_sim.client().models.list().data] == [MODEL]
    listing = json.loads(http_call("GET", f"{fast_sim.url}/v1/models")[2])
    assert listing["object"] == "list"
    entry = listing["data"][0]
    assert entry["owned_by"] == "vllm"
    assert entry["root"] == MODEL
    assert entry["parent"] is None
    assert entry["max_model_len"] == 256


def test_completion_has_vllm_shape_and_usage(fast_sim: SimProcess) -> None:
    status, headers, body = http_call(
        "POST",
        f"{fast_sim.url}/v1/completions",
        {"model": MODEL, "prompt": "one two three four", "max_tokens": 7},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    payload = json.loads(body)
    assert set(payload) == {"id", "object", "created", "model", "choices", "usage"}
    assert payload["id"].startswith("cmpl-")
    assert payload["object"] == "text_completion"
    assert isinstance(payload["created"], int)
    assert payload["model"] == MODEL
    [choice] = payload["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert choice["stop_reason"] is None
    assert len(choice["text"].split()) == 7
    assert payload["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}

    sdk_result = fast_sim.client().completions.create(
        model=MODEL, prompt="one two three four", max_tokens=7
    )
    assert sdk_result.choices[0].text == choice["text"]
    assert sdk_result.usage is not None and sdk_result.usage.total_tokens == 11


def test_chat_completion_has_openai_shape(fast_sim: SimProcess) -> None:
    result = fast_sim.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == MODEL
    [choice] = result.choices
    assert choice.message.role == "assistant"
    assert len(choice.message.content.split()) == 5
    assert choice.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + 5


def test_chat_follows_a_json_schema_response_format(fast_sim: SimProcess) -> None:
    """As vLLM's guided decoding: the answer is JSON that fits the schema, the same each time."""
    schema = {"type": "object", "required": ["label", "score", "n", "ok"], "properties": {
        "label": {"type": "string", "enum": ["good", "bad"]},
        "score": {"type": "number", "minimum": 1, "maximum": 10},
        "n": {"type": "integer", "minimum": 3, "maximum": 4}, "ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    client = fast_sim.client()
    answers = [client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"judge {i}"}], max_tokens=64,
        response_format=fmt) for i in range(8)]
    values = [json.loads(a.choices[0].message.content) for a in answers]
    for value, answer in zip(values, answers, strict=True):
        assert value["label"] in ("good", "bad") and 1 <= value["score"] <= 10
        assert value["n"] in (3, 4) and isinstance(value["ok"], bool)
        assert answer.choices[0].finish_reason == "stop"
    assert len({v["score"] for v in values}) > 1  # made up per prompt, not a constant
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "judge 0"}], max_tokens=64,
        response_format=fmt)
    assert json.loads(again.choices[0].message.content) == values[0]
    short = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "judge 0"}], max_tokens=2,
        response_format=fmt)
    assert short.choices[0].finish_reason == "length"  # cut short, as a real engine would be
    status, _, body = http_call("POST", f"{fast_sim.url}/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "date"}}}})
    # vLLM: its grammar backend's complaint, with no param.
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] is None and error["message"].startswith(
        "Grammar error: ")


def test_chat_default_max_tokens_prefers_max_completion_tokens(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    messages = [{"role": "user", "content": "defaults"}]
    # No max_tokens: as vLLM, the answer may fill what the prompt leaves of the context (256).
    default = client.chat.completions.create(model=MODEL, messages=messages)
    assert default.usage is not None and default.usage.total_tokens == 256
    preferred = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=3, max_tokens=9
    )
    assert preferred.usage is not None and preferred.usage.completion_tokens == 3


def test_text_is_deterministic_per_prompt(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    first = complete_text(client, "the same prompt", 12)
    assert complete_text(client, "the same prompt", 12) == first
    # A shorter answer is the beginning of the longer one, as with greedy decoding.
    assert first.startswith(complete_text(client, "the same prompt", 4))
    assert complete_text(client, "another prompt", 12) != first

    messages = [{"role": "user", "content": "the same prompt"}]
    chat_texts = {
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(chat_texts) == 1


def test_streamed_completion_equals_non_streamed(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    expected = complete_text(client, "stream me", 10)
    chunks = list(
        client.completions.create(model=MODEL, prompt="stream me", max_tokens=10, stream=True)
    )
    assert len(chunks) == 10  # one event per token
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * 9 + ["length"]


def test_streamed_chat_equals_non_streamed_and_reports_usage(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content_chunks = [c for c in chunks if c.choices]
    assert len(content_chunks) == 1 + 8  # the role chunk, then one per token
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 8
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(fast_sim: SimProcess) -> None:
    status, headers, body = http_call(
        "POST",
        f"{fast_sim.url}/v1/completions",
        {"model": MODEL, "prompt": "raw", "max_tokens": 3, "stream": True},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Transfer-Encoding"] == "chunked"
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert len(events) == 3 + 2


def test_stop_string_ends_generation_early(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    full = complete_text(client, "stop somewhere", 12)
    stop = " " + " ".join(full.split()[5:7])
    expected = full[: full.index(stop)]

    stopped = client.completions.create(
        model=MODEL, prompt="stop somewhere", max_tokens=12, stop=[stop, "never-generated"]
    )
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens < 12

    streamed = list(
        client.completions.create(
            model=MODEL, prompt="stop somewhere", max_tokens=12, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"

    raw = json.loads(
        http_call(
            "POST",
            f"{fast_sim.url}/v1/completions",
            {"model": MODEL, "prompt": "stop somewhere", "max_tokens": 12, "stop": stop},
        )[2]
    )
    assert raw["choices"][0]["stop_reason"] == stop


def test_prompt_list_gives_one_choice_per_prompt(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    result = client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=4)
    assert [choice.index for choice in result.choices] == [0, 1]
    assert result.choices[0].text == complete_text(client, "a b", 4)
    assert result.choices[1].text == complete_text(client, "c d e", 4)
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 8)


def test_unknown_model_is_not_found(fast_sim: SimProcess) -> None:
    client = fast_sim.client()
    with pytest.raises(openai.NotFoundError) as completion_error:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert completion_error.value.status_code == 404
    assert completion_error.value.body == {
        "message": "The model `no-such-model` does not exist. Valid aliases: sim-test-model.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )


def test_request_beyond_max_model_len_is_cut_or_refused(fast_sim: SimProcess) -> None:
    """As vLLM 0.32: max_tokens over the context is refused, a prompt that fills it is refused,
    and max_tokens that fits alone but not with the prompt is cut to what is left."""
    client = fast_sim.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="four words of prompt", max_tokens=257)
    assert error.value.body["message"].startswith("max_tokens=257 cannot be greater than "
                                                  "max_model_len=256.")
    assert error.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=5)
    assert "maximum context length is 256 tokens" in error.value.message
    assert error.value.body["param"] == "input_tokens"
    cut = client.completions.create(model=MODEL, prompt="four words of prompt", max_tokens=253)
    assert cut.usage is not None and cut.usage.total_tokens == 256
    assert cut.usage.completion_tokens == 252


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b'["a", "list"]'),
        ("/v1/completions", json.dumps({"model": MODEL}).encode()),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode()),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "stop": 5}).encode()),
    ],
)
def test_malformed_requests_get_vllm_error_body(fast_sim: SimProcess, path: str, raw: bytes):
    status, _, body = http_call("POST", f"{fast_sim.url}{path}", raw=raw)
    assert status == 400
    error = json.loads(body)["error"]
    # vLLM's two kinds: pydantic's validation errors, and its own checks after parsing.
    if error["type"] == "Bad Request":
        assert error["message"].startswith("1 validation error")
        assert error["param"].startswith("body")
    else:
        assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["message"]


def test_metrics_use_vllm_names_and_count_tokens(fast_sim: SimProcess) -> None:
    before = fast_sim.metrics()
    fast_sim.client().completions.create(model=MODEL, prompt="count these three", max_tokens=6)
    after = fast_sim.metrics()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "sim:client_disconnects_total",
    ):
        assert name in after, name
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 3
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 6
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 1
    assert (
        after["vllm:time_to_first_token_seconds_count"]
        - before["vllm:time_to_first_token_seconds_count"]
        == 1
    )
    assert after["vllm:num_requests_running"] == 0

    _, headers, body = http_call("GET", f"{fast_sim.url}/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}}' in body.decode()


# ---------------------------------------------------------------- timing and scheduling


def test_ttft_and_tpot_are_honoured(slow_sim: SimProcess) -> None:
    client = slow_sim.client()
    started = time.monotonic()
    client.completions.create(model=MODEL, prompt="timed", max_tokens=6)
    assert time.monotonic() - started >= 0.2 + 5 * 0.04 - CLOCK_SLACK

    started = time.monotonic()
    arrivals = []
    for _chunk in client.completions.create(model=MODEL, prompt="timed", max_tokens=6, stream=True):
        arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 6
    assert arrivals[0] >= 0.2 - CLOCK_SLACK
    assert arrivals[-1] >= 0.2 + 5 * 0.04 - CLOCK_SLACK
    assert arrivals[-1] - arrivals[0] >= 5 * 0.04 - CLOCK_SLACK


def test_requests_beyond_max_concurrency_wait_in_queue(slow_sim: SimProcess) -> None:
    client = slow_sim.client()
    token_counts: list[int] = []

    def stream_one(index: int) -> None:
        chunks = client.completions.create(
            model=MODEL, prompt=f"queued {index}", max_tokens=12, stream=True
        )
        token_counts.append(sum(1 for _ in chunks))

    workers = [threading.Thread(target=stream_one, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    seen_running, seen_waiting = set(), set()
    while any(worker.is_alive() for worker in workers):
        sample = slow_sim.metrics()
        seen_running.add(sample["vllm:num_requests_running"])
        seen_waiting.add(sample["vllm:num_requests_waiting"])
        time.sleep(0.02)
    for worker in workers:
        worker.join()

    assert token_counts == [12] * 4  # queued, not rejected
    assert max(seen_running) == 2
    assert 2 in seen_waiting
    final = slow_sim.metrics()
    assert (final["vllm:num_requests_running"], final["vllm:num_requests_waiting"]) == (0, 0)


def test_client_disconnect_frees_the_slot(slow_sim: SimProcess) -> None:
    disconnects_before = slow_sim.metrics()["sim:client_disconnects_total"]
    connection = http.client.HTTPConnection("127.0.0.1", slow_sim.port, timeout=10)
    body = {"model": MODEL, "prompt": "hang up", "max_tokens": 200, "stream": True}
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.read(16).startswith(b"data: ")  # generation is under way
    assert slow_sim.metrics()["vllm:num_requests_running"] == 1
    response.close()
    connection.close()

    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        sample = slow_sim.metrics()
        if sample["sim:client_disconnects_total"] > disconnects_before:
            break
        time.sleep(0.02)
    assert sample["sim:client_disconnects_total"] == disconnects_before + 1
    assert sample["vllm:num_requests_running"] == 0


# ---------------------------------------------------------------- process lifecycle and faults


def test_port_stays_closed_while_loading(start_sim: Callable[..., SimProcess]) -> None:
    started = time.monotonic()
    sim = start_sim("--load-seconds", "1.0", wait=False)
    refused_attempts = 0
    while not port_is_open(sim.port):
        assert sim.proc.poll() is None, sim.stderr()
        assert time.monotonic() - started < 15, "sim never opened its port"
        refused_attempts += 1
        time.sleep(0.02)
    assert time.monotonic() - started >= 1.0
    assert refused_attempts > 0
    sim.wait_until_healthy()
    assert f"sim engine ready: model={MODEL} port={sim.port}" in sim.stderr()


def test_fail_start_exits_with_code_2(start_sim: Callable[..., SimProcess]) -> None:
    started = time.monotonic()
    sim = start_sim("--fail-start", "--load-seconds", "0.2", wait=False)
    assert sim.proc.wait(timeout=10) == 2
    assert time.monotonic() - started >= 0.2
    assert "error" in sim.stderr()
    assert "ready" not in sim.stderr()


@pytest.mark.parametrize(
    ("files", "complaint"),
    [([], "config.json"), (["config.json"], "safetensors")],
)
def test_snapshot_without_weights_refuses_to_start(
    start_sim: Callable[..., SimProcess], tmp_path: Path, files: list[str], complaint: str
) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in files:
        (snapshot / name).write_text("{}")
    sim = start_sim("--snapshot-dir", str(snapshot), wait=False)
    assert sim.proc.wait(timeout=10) == 2
    assert complaint in sim.stderr()


def test_complete_snapshot_starts(start_sim: Callable[..., SimProcess], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"\0")
    sim = start_sim("--snapshot-dir", str(tmp_path))
    assert complete_text(sim.client(), "weights present", 2)


def test_crash_after_cuts_the_stream_and_exits_3(start_sim: Callable[..., SimProcess]) -> None:
    sim = start_sim("--crash-after", "2", "--tpot-ms", "10")
    client = sim.client()
    assert complete_text(client, "first request survives", 4)

    received = []
    with pytest.raises(openai.APIConnectionError) as cut:
        for chunk in client.completions.create(
            model=MODEL, prompt="second request dies", max_tokens=20, stream=True
        ):
            received.append(chunk)
    assert 0 < len(received) < 20, cut.value
    assert sim.proc.wait(timeout=5) == 3
    assert "crash" in sim.stderr()


def test_crash_after_non_streaming_request(start_sim: Callable[..., SimProcess]) -> None:
    sim = start_sim("--crash-after", "1")
    with pytest.raises(openai.APIConnectionError):
        sim.client().completions.create(model=MODEL, prompt="dies", max_tokens=4)
    assert sim.proc.wait(timeout=5) == 3


def test_sleep_and_wake_up(start_sim: Callable[..., SimProcess]) -> None:
    sim = start_sim("--sleep-seconds", "0.3", "--wake-seconds", "0.4")
    client = sim.client()
    assert json.loads(http_call("GET", f"{sim.url}/is_sleeping")[2]) == {"is_sleeping": False}

    started = time.monotonic()
    status, _, body = http_call("POST", f"{sim.url}/sleep?level=1")
    assert (status, json.loads(body)) == (200, {"status": "sleeping", "level": 1})
    assert time.monotonic() - started >= 0.3 - CLOCK_SLACK
    assert json.loads(http_call("GET", f"{sim.url}/is_sleeping")[2]) == {"is_sleeping": True}
    # As vLLM: a call made while asleep is neither refused nor queued; it waits for the wake-up.
    held: list = []
    caller = threading.Thread(target=lambda: held.append(complete_text(client, "anyone home", 2)))
    caller.start()
    time.sleep(0.5)
    assert held == [] and sim.metrics()["vllm:num_requests_waiting"] == 0

    started = time.monotonic()
    status, _, body = http_call("POST", f"{sim.url}/wake_up")
    assert (status, json.loads(body)) == (200, {"status": "awake", "tags": None})
    assert time.monotonic() - started >= 0.4 - CLOCK_SLACK
    assert json.loads(http_call("GET", f"{sim.url}/is_sleeping")[2]) == {"is_sleeping": False}
    caller.join(timeout=5)
    assert held == [complete_text(client, "anyone home", 2)]


def test_sigterm_exits_zero_promptly_even_mid_stream(
    start_sim: Callable[..., SimProcess],
) -> None:
    sim = start_sim("--tpot-ms", "50")
    stream = sim.client().completions.create(
        model=MODEL, prompt="interrupted", max_tokens=100, stream=True
    )
    next(iter(stream))  # a request is in flight when the signal arrives
    started = time.monotonic()
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 1.0
    stream.close()
