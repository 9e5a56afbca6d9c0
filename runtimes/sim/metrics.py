"""The sim engine's Prometheus metrics: vLLM's metric names, labels and histogram buckets."""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtimes.sim.protocol import GenerationJob
    from runtimes.sim.scheduler import SlotScheduler

# Prometheus text exposition format 0.0.4, what vLLM serves on /metrics.
METRICS_HEADERS = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
# vLLM's own bucket edges, so dashboards built for vLLM read the sim the same way.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)


class _Histogram:
    __slots__ = ("bounds", "bucket_counts", "count", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.bucket_counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.bucket_counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value


class EngineMetrics:
    """vLLM's Prometheus metrics, kept as plain numbers and rendered only when scraped."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # vLLM's finished reasons; the sim's requests only ever stop or reach their length (a
        # request whose client hung up is not counted, as vLLM does not count it either).
        self.successes: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0,
                                          "repetition": 0}
        self.client_disconnects = 0
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)

    def record_success(self, job: GenerationJob, e2e_seconds: float) -> None:
        self.generation_tokens += sum(g.token_count for g in job.generations)
        for generation in job.generations:
            self.successes[generation.finish_reason] += 1
        self.e2e.observe(e2e_seconds)

    def render(self, model_name: str, scheduler: SlotScheduler, sleep_level: int = 0) -> str:
        # vLLM labels every engine series with the engine index (0: one engine per server).
        label = f'engine="0",model_name="{_escape_label(model_name)}"'
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution.")
        lines.append(f"vllm:num_requests_running{{{label}}} {float(scheduler.running)}")
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        lines.append(f"vllm:num_requests_waiting{{{label}}} {float(scheduler.waiting)}")
        family("vllm:num_requests_waiting_by_reason", "gauge",
               "Number of requests waiting, by the reason they wait.")
        for reason, count in (("capacity", scheduler.waiting), ("deferred", 0)):
            lines.append(f'vllm:num_requests_waiting_by_reason{{{label},reason="{reason}"}} '
                         f"{float(count)}")
        family("vllm:engine_sleep_state", "gauge",
               "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
               "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means "
               "sleep level 2.")
        for state, on in (("awake", sleep_level == 0), ("weights_offloaded", sleep_level == 1),
                          ("discard_all", sleep_level == 2)):
            lines.append(f'vllm:engine_sleep_state{{{label},sleep_state="{state}"}} '
                         f"{float(on)}")
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        lines.append(
            f"vllm:kv_cache_usage_perc{{{label}}} {scheduler.running / scheduler.capacity}"
        )
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        lines.append(f"vllm:prompt_tokens_total{{{label}}} {float(self.prompt_tokens)}")
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        lines.append(f"vllm:generation_tokens_total{{{label}}} {float(self.generation_tokens)}")
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason, count in self.successes.items():
            lines.append(
                f'vllm:request_success_total{{{label},finished_reason="{reason}"}} {float(count)}'
            )
        for name, histogram, help_text in (
            ("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token."),
            ("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency."),
        ):
            family(name, "histogram", help_text)
            cumulative = 0
            for bound, count in zip(
                (*histogram.bounds, "+Inf"), histogram.bucket_counts, strict=True
            ):
                cumulative += count
                lines.append(f'{name}_bucket{{le="{bound}",{label}}} {float(cumulative)}')
            lines.append(f"{name}_count{{{label}}} {float(histogram.count)}")
            lines.append(f"{name}_sum{{{label}}} {histogram.total}")
        family(
            "sim:client_disconnects_total",
            "counter",
            "Requests whose client hung up before the answer was complete.",
        )
        lines.append(f"sim:client_disconnects_total{{{label}}} {float(self.client_disconnects)}")
        return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
