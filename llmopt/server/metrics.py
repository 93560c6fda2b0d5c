"""Prometheus metrics for /metrics, in a registry of the server's own (one per app,
so that tests can run several).

Engine state (requests running and waiting, KV blocks, prefix-cache tokens) is read
at scrape time, summed over the loaded models' engines, and so are the models' own
series (loaded or not, bytes held, loads, unloads by reason, load seconds); latencies
and token counts are recorded as each request finishes, speculative decoding's counts
too (under vLLM's names, so that its dashboards' acceptance rate and mean accepted
length apply: accepted / draft tokens, and 1 + accepted tokens / drafts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from llmopt.engine.engine_loop import EngineLoad
from llmopt.engine.outputs import RequestStats
from llmopt.server.model_manager import ModelManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. TTFT spans prompt-cache hits (ms) to long prefills behind a queue (minutes).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class _EngineCollector(Collector):
    def __init__(self, load: Callable[[], EngineLoad]) -> None:
        self.load = load

    def collect(self) -> Iterator[Metric]:
        s = self.load()
        yield GaugeMetricFamily("llmopt_requests_running", "Requests in the batch", s.running)
        yield GaugeMetricFamily("llmopt_requests_waiting", "Requests queued", s.waiting)
        yield GaugeMetricFamily("llmopt_kv_blocks_used", "KV blocks in use", s.kv_blocks_used)
        yield GaugeMetricFamily("llmopt_kv_blocks_total", "KV blocks in all", s.kv_blocks_total)
        yield GaugeMetricFamily(
            "llmopt_kv_cache_tokens_total",
            "Tokens the KV cache holds (its element types set how many fit)",
            s.kv_blocks_total * s.kv_block_size,
        )
        yield GaugeMetricFamily(
            "llmopt_kv_cache_tokens_used",
            "Tokens of KV cache held by requests",
            s.kv_blocks_used * s.kv_block_size,
        )
        yield GaugeMetricFamily(
            "llmopt_prefix_cache_tokens",
            "Tokens in full blocks the prefix cache holds",
            s.prefix_cached_blocks * s.kv_block_size,
        )
        looked_up = s.prefix_hit_tokens + s.prefix_miss_tokens
        yield GaugeMetricFamily(
            "llmopt_prefix_cache_hit_rate",
            "Share of prompt tokens whose KV came from the prefix cache",
            s.prefix_hit_tokens / looked_up if looked_up else 0.0,
        )
        yield CounterMetricFamily(
            "llmopt_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache",
            s.prefix_hit_tokens,
        )
        yield CounterMetricFamily(
            "llmopt_prefix_cache_miss_tokens", "Prompt tokens computed", s.prefix_miss_tokens
        )


class _ModelsCollector(Collector):
    def __init__(self, models: ModelManager) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        models = list(self.models.models.values())
        yield GaugeMetricFamily(
            "llmopt_models_loaded", "Models loaded now", len(self.models.loaded())
        )
        yield GaugeMetricFamily(
            "llmopt_memory_held_bytes",
            "Bytes of weights and KV cache the loaded models hold",
            self.models.held_bytes(),
        )
        if self.models.budget_bytes is not None:
            yield GaugeMetricFamily(
                "llmopt_memory_budget_bytes",
                "The memory budget for the loaded models",
                self.models.budget_bytes,
            )
        loaded = GaugeMetricFamily("llmopt_model_loaded", "1 if loaded", labels=["model"])
        held = GaugeMetricFamily(
            "llmopt_model_bytes",
            "Bytes of weights and KV cache (measured once loaded, estimated before)",
            labels=["model"],
        )
        loads = CounterMetricFamily("llmopt_model_loads", "Model loads", labels=["model"])
        unloads = CounterMetricFamily(
            "llmopt_model_unloads",
            "Model unloads by reason: room (for another model), idle (keep-alive)",
            labels=["model", "reason"],
        )
        seconds = SummaryMetricFamily(
            "llmopt_model_load_seconds", "Time to load a model", labels=["model"]
        )
        for m in models:
            loaded.add_metric([m.name], int(m.engine is not None))
            held.add_metric([m.name], m.bytes)
            loads.add_metric([m.name], m.loads)
            for reason in ("room", "idle"):
                unloads.add_metric([m.name, reason], m.unloads[reason])
            seconds.add_metric([m.name], m.loads, m.load_seconds)
        yield from (loaded, held, loads, unloads, seconds)


class ServerMetrics:
    def __init__(self, models: ModelManager) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_EngineCollector(models.load))
        r.register(_ModelsCollector(models))
        self.requests = Counter(
            "llmopt_requests",
            "Finished requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.response_cache = Counter(
            "llmopt_response_cache",
            "Response-cache lookups by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.prompt_tokens = Counter("llmopt_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(
            "llmopt_generation_tokens", "Tokens generated by the engine", registry=r
        )
        self.ttft = Histogram(
            "llmopt_time_to_first_token_seconds",
            "Time to first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llmopt_inter_token_latency_seconds",
            "Time between consecutive tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llmopt_e2e_request_latency_seconds",
            "Request start to last token",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.spec_drafts = Counter(
            "llmopt_spec_decode_num_drafts",
            "Speculative decoding: verification rounds of drafted tokens",
            registry=r,
        )
        self.spec_draft_tokens = Counter(
            "llmopt_spec_decode_num_draft_tokens",
            "Speculative decoding: tokens drafted",
            registry=r,
        )
        self.spec_accepted_tokens = Counter(
            "llmopt_spec_decode_num_accepted_tokens",
            "Speculative decoding: drafted tokens accepted",
            registry=r,
        )

    def observe_generation(self, stats: RequestStats) -> None:
        """One engine request (one choice) finished."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.completion_tokens)
        if stats.completion_tokens:
            self.ttft.observe(stats.ttft_s)
        for gap in stats.itl_s:
            self.itl.observe(gap)
        self.e2e.observe(stats.total_s)
        self.spec_drafts.inc(stats.spec_rounds)
        self.spec_draft_tokens.inc(stats.spec_draft_tokens)
        self.spec_accepted_tokens.inc(stats.spec_accepted_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
