"""Prometheus metrics of one app, in its own CollectorRegistry (two apps in one process never collide).

Three sources: HTTP answers (counted by the app's middleware), each engine's counters and gauges (read
at scrape time), and per-request latencies observed from the engine's timestamps once a request has been
answered (`observe_sequence`, called on the observer's thread, never on the request path). Engine and
per-request series also carry vLLM's names, label names (`model_name`, plus our `version`) and buckets
(vllm/v1/metrics/loggers.py), so dashboards and autoscalers written for vLLM read them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmadapter.engine.base import Engine, EngineStats
    from llmadapter.engine.scheduler import Sequence
    from llmadapter.engine.timing import SequenceTimes
    from llmadapter.server.served import ServingState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# vLLM's buckets, so that its dashboards' quantiles and SLO thresholds mean the same here.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM sizes its token buckets 1-2-5 up to the model's window; one registry serves several models, so
# the same 1-2-5 steps run up to a window no model here exceeds.
_TOKEN_BUCKETS = (*(m * 10**e for e in range(6) for m in (1, 2, 5)), 1_000_000)
_VLLM_LABELS = ["model_name", "version"]
# Our finish reasons as vLLM's `finished_reason` label says them.
_FINISHED_REASON = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}

# Per-request histograms (key: vLLM name, help, buckets), observed from SequenceTimes by `latencies`.
_REQUEST_HISTOGRAMS = {
    "ttft": ("vllm:time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS),
    "itl": ("vllm:inter_token_latency_seconds", "Time between consecutive tokens.", _TOKEN_LATENCY_BUCKETS),
    "tpot": (
        "vllm:request_time_per_output_token_seconds",
        "Decode time per token after the first, per request.",
        _TOKEN_LATENCY_BUCKETS,
    ),
    "queue": ("vllm:request_queue_time_seconds", "Queued until scheduled.", _REQUEST_BUCKETS),
    "prefill": ("vllm:request_prefill_time_seconds", "Scheduled until first token.", _REQUEST_BUCKETS),
    "decode": ("vllm:request_decode_time_seconds", "First token until last token.", _REQUEST_BUCKETS),
    "inference": ("vllm:request_inference_time_seconds", "Scheduled until last token.", _REQUEST_BUCKETS),
    "e2e": ("vllm:e2e_request_latency_seconds", "Arrival until finished.", _REQUEST_BUCKETS),
    "prompt_tokens": ("vllm:request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS),
    "generation_tokens": ("vllm:request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS),
}

# Engine numbers read at scrape time: (family, name, help, EngineStats field), under our names (label
# `model`) and under vLLM's (labels `model_name`, `version`).
_Family = type[GaugeMetricFamily] | type[CounterMetricFamily]
_OUR_ENGINE_SERIES: tuple[tuple[_Family, str, str, str], ...] = (
    (GaugeMetricFamily, "llmadapter_queue_depth", "Sequences waiting for a batch slot.", "queue_depth"),
    (GaugeMetricFamily, "llmadapter_running", "Sequences being generated now.", "running"),
    (CounterMetricFamily, "llmadapter_prompt_tokens", "Prompt (input) tokens processed.", "prompt_tokens"),
    (
        CounterMetricFamily,
        "llmadapter_completion_tokens",
        "Completion (output) tokens generated.",
        "completion_tokens",
    ),
    (
        CounterMetricFamily,
        "llmadapter_prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        "prefix_cache_queries",
    ),
    (
        CounterMetricFamily,
        "llmadapter_prefix_cache_hits",
        "Prompt tokens whose KV came from the prefix cache instead of a prefill.",
        "prefix_cache_hits",
    ),
    (
        GaugeMetricFamily,
        "llmadapter_prefix_cache_bytes",
        "Bytes of keys and values the prefix cache holds.",
        "prefix_cache_bytes",
    ),
)
_VLLM_ENGINE_SERIES: tuple[tuple[_Family, str, str, str], ...] = (
    (GaugeMetricFamily, "vllm:num_requests_running", "Sequences in the running batch.", "running"),
    (GaugeMetricFamily, "vllm:num_requests_waiting", "Sequences waiting for the batch.", "queue_depth"),
    (CounterMetricFamily, "vllm:prompt_tokens", "Prompt tokens prefilled.", "prompt_tokens"),
    (CounterMetricFamily, "vllm:generation_tokens", "Tokens generated.", "completion_tokens"),
    (
        CounterMetricFamily,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in tokens.",
        "prefix_cache_queries",
    ),
    (CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", "prefix_cache_hits"),
)


def latencies(times: SequenceTimes, end: float) -> dict[str, float]:
    """The per-request latencies a finished sequence has, by `_REQUEST_HISTOGRAMS` key (vLLM's
    definitions); `end` stands in for a finish the scheduler has not stamped yet (a cancelled stream)."""
    values = {"e2e": (times.finished or end) - times.arrival}
    if times.scheduled is not None and times.queued is not None:
        values["queue"] = times.scheduled - times.queued
    if times.first_token is not None and times.last_token is not None:
        values["ttft"] = times.first_token - times.arrival
        values["decode"] = times.last_token - times.first_token
        if times.gaps:
            values["tpot"] = values["decode"] / len(times.gaps)
        if times.scheduled is not None:
            values["prefill"] = times.first_token - times.scheduled
            values["inference"] = times.last_token - times.scheduled
    return values


class _EngineCollector(Collector):
    """Reads each engine's EngineStats at scrape time: the engine owns the numbers, we only expose them."""

    def __init__(
        self,
        engines: Callable[[], Mapping[str, Engine]],
        states: Callable[[], Mapping[str, ServingState]] = dict,
    ) -> None:
        self._engines = engines

    def collect(self) -> Iterable[Metric]:
        engines = dict(self._engines())
        ours = [family(name, doc, labels=["model"]) for family, name, doc, _ in _OUR_ENGINE_SERIES]
        vllm = [family(name, doc, labels=_VLLM_LABELS) for family, name, doc, _ in _VLLM_ENGINE_SERIES]
        # EngineStats keeps a trimmed window of per-step batch sizes, not a monotonic count, so it is
        # exposed as a gauge histogram: the distribution over the engine's recent forward steps.
        batches = GaugeHistogramMetricFamily(
            "llmadapter_batch_size", "Batch size of the engine's recent forward steps.", labels=["model"]
        )
        for name, engine in engines.items():
            stats = engine.stats
            _add(ours, _OUR_ENGINE_SERIES, [name], stats)
            _add(vllm, _VLLM_ENGINE_SERIES, [name, engine.model_version], stats)
            sizes = list(stats.batch_sizes)
            buckets = [(str(b), sum(1 for s in sizes if s <= b)) for b in _BATCH_BUCKETS]
            buckets.append(("+Inf", len(sizes)))
            batches.add_metric([name], buckets, gsum_value=sum(sizes))
        yield from (*ours, batches, *vllm)


class _ServingCollector(Collector):
    """Which version each name serves and how swapping to new ones went (read from ServingState)."""

    def __init__(self, states: Callable[[], Mapping[str, ServingState]]) -> None:
        self._states = states

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "llmadapter_model_version_info",
            "1 for the registry version each model name answers with now (and the alias it follows).",
            labels=["model", "version", "alias"],
        )
        swaps = CounterMetricFamily(
            "llmadapter_model_swaps",
            "Version swaps by outcome: swapped, failed (load, warm or smoke request), refused (validation "
            "failed or another task).",
            labels=["model", "outcome"],
        )
        failing = GaugeMetricFamily(
            "llmadapter_model_swap_failing",
            "1 while the alias points at a version that could not be swapped in (the old one answers).",
            labels=["model"],
        )
        seconds = GaugeMetricFamily(
            "llmadapter_model_swap_seconds",
            "The last swap's duration: load, warm and switch (drain: also the wait for running requests).",
            labels=["model"],
        )
        for name, state in sorted(self._states().items()):
            info.add_metric([name, state.version, state.alias or ""], 1)
            swaps.add_metric([name, "swapped"], state.swaps)
            swaps.add_metric([name, "failed"], state.swap_failures)
            swaps.add_metric([name, "refused"], state.swap_refusals)
            failing.add_metric([name], 1 if state.swap_failure else 0)
            if state.swap_seconds is not None:
                seconds.add_metric([name], state.swap_seconds)
        yield from (info, swaps, failing, seconds)


def _add(
    families: list[GaugeMetricFamily | CounterMetricFamily],
    series: tuple[tuple[_Family, str, str, str], ...],
    labels: list[str],
    stats: EngineStats,
) -> None:
    for family, (_, _, _, field) in zip(families, series, strict=True):
        family.add_metric(labels, getattr(stats, field))


class _ModelSeries(NamedTuple):
    """The per-request instruments' children for one (model, version): looked up once, not per token."""

    histograms: dict[str, Histogram]
    finished: dict[str, Counter]


class ServerMetrics:
    """The app's instruments; middleware and the observer record, GET /metrics renders."""

    def __init__(
        self,
        engines: Callable[[], Mapping[str, Engine]],
        states: Callable[[], Mapping[str, ServingState]] = dict,
    ) -> None:
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
            "Time from request to the first streamed chunk (the start of a server-sent event answer).",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "llmadapter_in_flight_requests",
            "Generation and embedding requests admitted and not yet answered.",
            registry=self.registry,
        )
        self._request_histograms = {
            key: Histogram(name, doc, _VLLM_LABELS, buckets=buckets, registry=self.registry)
            for key, (name, doc, buckets) in _REQUEST_HISTOGRAMS.items()
        }
        self._finished = Counter(
            "vllm:request_success",
            "Sequences finished, by finished_reason (stop, length, abort, error).",
            [*_VLLM_LABELS, "finished_reason"],
            registry=self.registry,
        )
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self.registry.register(_EngineCollector(engines))
        self.registry.register(_ServingCollector(states))

    def _model_series(self, model: str, version: str) -> _ModelSeries:
        series = self._series.get((model, version))
        if series is None:
            histograms = {key: h.labels(model, version) for key, h in self._request_histograms.items()}
            # Every reason from the start, as vLLM does: a rate over a series that never appeared is empty.
            finished = {r: self._finished.labels(model, version, r) for r in _FINISHED_REASON.values()}
            series = self._series[(model, version)] = _ModelSeries(histograms, finished)
        return series

    def observe_sequence(self, engine: Engine, seq: Sequence, now: float) -> None:
        """Record one answered sequence of `engine` (a sequence never submitted is not recorded)."""
        if seq.times.queued is None:
            return
        series = self._model_series(engine.model_name, engine.model_version)
        reason = seq.finish_reason or "cancelled"
        reason = _FINISHED_REASON.get(reason, reason)
        counter = series.finished.get(reason)
        if counter is None:
            counter = series.finished[reason] = self._finished.labels(
                engine.model_name, engine.model_version, reason
            )
        counter.inc()
        histograms = series.histograms
        for key, value in latencies(seq.times, now).items():
            histograms[key].observe(value)
        itl = histograms["itl"]
        for gap in seq.times.gaps:
            itl.observe(gap)
        histograms["prompt_tokens"].observe(len(seq.prompt_ids))
        histograms["generation_tokens"].observe(len(seq.generated))

    def render(self) -> bytes:
        return generate_latest(self.registry)
