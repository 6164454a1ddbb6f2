"""`GET /metrics` for Prometheus, through prometheus-client.

Names follow vLLM's where the meaning is the same, under `jaxchat:` instead of
`vllm:`, so dashboards carry over:
- now (read from the scheduler at each scrape): `num_requests_running`,
  `num_requests_waiting`, `kv_cache_usage_perc` (0-1: pool blocks held by
  sequences), `prefix_cache_hit_blocks_total`, `prefix_cache_hit_tokens_total`,
  `engine_step_seconds` (a summary: steps and their summed time from dispatch to
  delivered tokens), and
  `executables_pending` (steps still loading or compiling in the background);
- per request: histograms `time_to_first_token_seconds`,
  `time_per_output_token_seconds`, `e2e_request_latency_seconds`,
  `request_prompt_tokens`, `request_generation_tokens`; counters
  `prompt_tokens_total`, `generation_tokens_total`, `request_success_total` by
  `finished_reason` (one per choice), `http_requests_total` by route and status,
  and `response_cache_queries_total` by result (hit/miss).
Each handler has its own registry, so tests can build many.
"""

from collections.abc import Iterator, Sequence

import flask
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from handler.model_host import ModelHost

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
PER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
ROUTES = ("/chat/completions", "/completions", "/embeddings", "/models", "/usage")


class Metrics:
    """The server's metrics, and the `/metrics` response."""

    def __init__(self, host: ModelHost) -> None:
        self.registry = CollectorRegistry()
        self.ttft = self._histogram(
            "time_to_first_token_seconds",
            "Time from receiving a generation request to its first token.",
            LATENCY_BUCKETS,
        )
        self.per_token = self._histogram(
            "time_per_output_token_seconds",
            "Time per output token after the first, per request.",
            PER_TOKEN_BUCKETS,
        )
        self.e2e = self._histogram(
            "e2e_request_latency_seconds",
            "Time from receiving a generation request to its reply's end.",
            LATENCY_BUCKETS,
        )
        self.prompt_length = self._histogram(
            "request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.generation_length = self._histogram(
            "request_generation_tokens",
            "Generated tokens per request (all choices).",
            TOKEN_BUCKETS,
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.")
        self.finished = self._counter(
            "request_success", "Choices finished, by reason.", "finished_reason"
        )
        self.http = self._counter(
            "http_requests", "HTTP requests by route and status.", "route", "status"
        )
        self.cache = self._counter(
            "response_cache_queries",
            "Response cache lookups of cacheable requests, by result.",
            "result",
        )
        self.registry.register(EngineCollector(host))

    def _histogram(self, name: str, text: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(f"jaxchat:{name}", text, registry=self.registry, buckets=buckets)

    def _counter(self, name: str, text: str, *labels: str) -> Counter:
        return Counter(f"jaxchat:{name}", text, labels, registry=self.registry)

    def generation(
        self,
        seconds: float,
        first_token_s: float | None,
        prompt: int,
        completion: int,
        reasons: Sequence[str],
    ) -> None:
        """Record one generation request that ended after `seconds`."""
        self.e2e.observe(seconds)
        if first_token_s is not None:
            self.ttft.observe(first_token_s)
            if completion > 1:
                self.per_token.observe((seconds - first_token_s) / (completion - 1))
        self.prompt_length.observe(prompt)
        self.generation_length.observe(completion)
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        for reason in reasons:
            self.finished.labels(reason).inc()

    def request(self, path: str, status: int) -> None:
        self.http.labels(route_label(path), str(status)).inc()

    def response(self) -> flask.Response:
        return flask.Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)


def route_label(path: str) -> str:
    """A bounded label for a path: the route it reached (without its prefix), or "other"."""
    if path in ("/", "/health", "/metrics"):
        return path
    for prefix in ("/api/v1", "/v1", ""):
        rest = path.removeprefix(prefix)
        if rest in ROUTES:
            return rest
        if rest.startswith("/models/"):
            return "/models/{id}"
    return "other"


class EngineCollector(Collector):
    """The scheduler's state at scrape time (nothing until the model is loaded)."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        if self.host.status != "ready":
            return
        stats = self.host.llm().stats()
        yield GaugeMetricFamily(
            "jaxchat:num_requests_running", "Sequences in decode slots.", stats.running
        )
        yield GaugeMetricFamily(
            "jaxchat:num_requests_waiting", "Requests waiting for a slot.", stats.waiting
        )
        yield GaugeMetricFamily(
            "jaxchat:executables_pending",
            "Compiled steps (required, and faster upgrades) not yet in memory: until 0, the "
            "server loads or compiles them in the background and a request may stall.",
            stats.pending_executables,
        )
        yield GaugeMetricFamily(
            "jaxchat:kv_cache_usage_perc",
            "Fraction of KV pool blocks held by sequences (1 = full).",
            stats.used_blocks / max(stats.pool_blocks, 1),
        )
        yield CounterMetricFamily(
            "jaxchat:prefix_cache_hit_blocks",
            "KV blocks served from the prefix cache instead of prefilled.",
            stats.prefix_hit_blocks,
        )
        yield CounterMetricFamily(
            "jaxchat:prefix_cache_hit_tokens",
            "Prompt positions whose keys and values came from the prefix cache (its whole "
            "blocks, and the start of a begun block, copied) instead of being computed.",
            stats.prefix_hit_tokens,
        )
        yield CounterMetricFamily(
            "jaxchat:spec_decode_num_draft_tokens",
            "Speculative draft tokens verified.",
            stats.draft_tokens,
        )
        yield CounterMetricFamily(
            "jaxchat:spec_decode_num_accepted_tokens",
            "Speculative draft tokens accepted.",
            stats.accepted_tokens,
        )
        yield SummaryMetricFamily(
            "jaxchat:engine_step_seconds",
            "Engine steps and their time from dispatch to delivered tokens.",
            count_value=stats.steps,
            sum_value=stats.step_seconds,
        )
