"""Prometheus metrics: engine gauges and counters read at scrape time, latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "ferrolm_"


class EngineCollector:
    def __init__(self, stats_fn, model_name: str) -> None:
        self.stats_fn = stats_fn
        self.model_name = model_name

    def collect(self):
        s = self.stats_fn()
        labels = {"model_name": self.model_name}

        def gauge(name, doc, value, extra=None):
            lab = {**labels, **(extra or {})}
            g = GaugeMetricFamily(PREFIX + name, doc, labels=list(lab))
            g.add_metric(list(lab.values()), value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(PREFIX + name, doc, labels=list(labels))
            c.add_metric(list(labels.values()), value)
            return c

        total = s["kv_blocks_total"] or 1
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", s["kv_blocks_used"] / total
        )
        yield gauge("kv_cache_blocks_used", "KV cache blocks in use.", s["kv_blocks_used"])
        yield gauge("kv_cache_blocks_total", "KV cache blocks in the pool.", s["kv_blocks_total"])
        yield gauge("kv_cache_used_bytes", "KV cache bytes held by sequences.", s["kv_used_bytes"])
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV cache holds.", s["kv_tokens_capacity"])
        yield gauge("kv_cache_bytes_per_token", "KV bytes per token, whole model.", s["kv_bytes_per_token"])
        yield gauge("kv_cache_info", "KV cache configuration.", 1, {"kv_cache_dtype": s["kv_dtype"]})
        yield gauge("num_requests_running", "Sequences being computed.", s["num_running"])
        yield gauge("num_requests_waiting", "Sequences waiting for KV space or a slot.", s["num_waiting"])
        yield counter("num_preemptions", "Sequences preempted for recompute.", s["num_preemptions"])
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s["prefix_cache_queries"]
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits"])
        yield counter("prompt_tokens", "Prompt tokens received.", s["prompt_tokens_total"])
        yield counter("generation_tokens", "Tokens generated.", s["generation_tokens_total"])


class ServerMetrics:
    def __init__(self, stats_fn, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats_fn, model_name))
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
            registry=self.registry,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time between consecutive generated tokens.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

    def observe(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.tpot).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
