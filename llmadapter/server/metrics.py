"""Prometheus metrics of one app, in its own CollectorRegistry (two apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmadapter.engine.base import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _EngineCollector(Collector):
    """Reads each engine's EngineStats at scrape time: the engine owns the numbers, we only expose them."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterable[Metric]:
        engines = dict(self._engines())
        queue = GaugeMetricFamily(
            "llmadapter_queue_depth", "Sequences waiting for a batch slot.", labels=["model"]
        )
        running = GaugeMetricFamily("llmadapter_running", "Sequences being generated now.", labels=["model"])
        prompt = CounterMetricFamily(
            "llmadapter_prompt_tokens", "Prompt (input) tokens processed.", labels=["model"]
        )
        completion = CounterMetricFamily(
            "llmadapter_completion_tokens", "Completion (output) tokens generated.", labels=["model"]
        )
        # EngineStats keeps a trimmed window of per-step batch sizes, not a monotonic count, so it is
        # exposed as a gauge histogram: the distribution over the engine's recent forward steps.
        batches = GaugeHistogramMetricFamily(
            "llmadapter_batch_size", "Batch size of the engine's recent forward steps.", labels=["model"]
        )
        for name, engine in engines.items():
            stats = engine.stats
            queue.add_metric([name], stats.queue_depth)
            running.add_metric([name], stats.running)
            prompt.add_metric([name], stats.prompt_tokens)
            completion.add_metric([name], stats.completion_tokens)
            sizes = list(stats.batch_sizes)
            buckets = [(str(b), sum(1 for s in sizes if s <= b)) for b in _BATCH_BUCKETS]
            buckets.append(("+Inf", len(sizes)))
            batches.add_metric([name], buckets, gsum_value=sum(sizes))
        yield from (queue, running, prompt, completion, batches)


class ServerMetrics:
    """The app's instruments; handlers and middleware record, GET /metrics renders."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmadapter_requests",
            "HTTP requests answered, by route, model and status code.",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "llmadapter_errors",
            "Error answers (including errors inside streams), by route and OpenAI error type.",
            ["route", "type"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmadapter_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llmadapter_time_to_first_token_seconds",
            "Time from request to the first streamed chunk.",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "llmadapter_in_flight_requests",
            "Generation and embedding requests admitted and not yet answered.",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engines))

    def render(self) -> bytes:
        return generate_latest(self.registry)
