"""The trace exporter: sampled traces leave the serving process through a bounded queue and are written
to MLflow by a child process at the lowest CPU priority.

Why a process: MLflow's client is heavy Python (an SQLite store spends ~8 ms of CPU per trace in
SQLAlchemy), and in a thread of the server it would hold the GIL the event loop and the scheduler need;
as a child at nice 19 it only gets the CPU the server leaves. Nothing ever waits for it: a full queue
drops the trace at once (`queue_full`), a store that fails drops the batch it was given
(`export_failed`), and both are counted, with what was written, in counters the child shares with the
server and /metrics reads at scrape time. How long one write may block is MLflow's HTTP client settings
(`MLFLOW_HTTP_REQUEST_TIMEOUT`, `MLFLOW_HTTP_REQUEST_MAX_RETRIES`), which the child inherits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmadapter.server.tracing import ServedTrace, TraceWriter

log = logging.getLogger("llmadapter.server.traces")

# Traces written per round trip at most, when the queue holds several.
_BATCH = 64
# The child yields the CPU to the server: at the lowest priority it writes with what the server leaves
# idle; under sustained saturation its queue fills and traces are dropped (counted), not served slower.
_NICENESS = 19
# How often the child checks that the server is still there (seconds).
_PARENT_CHECK_S = 1.0
# Shared counters, by index.
_EXPORTED, _FAILED, _FULL = range(3)


def _batches(traces: Any, parent: int) -> Iterable[list[ServedTrace]]:
    """Batches from the queue until the server sends None or goes away."""
    while os.getppid() == parent:
        try:
            item = traces.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            continue
        batch: list[ServedTrace] = []
        while item is not None:
            batch.append(item)
            if len(batch) >= _BATCH:
                break
            try:
                item = traces.get_nowait()
            except queue.Empty:
                break
        if batch:
            yield batch
        if item is None:
            return


def export_forever(traces: Any, counts: Any, tracking_uri: str, experiment: str, parent: int) -> None:
    """The child's main: write what arrives, count it, warn once per outage."""
    os.nice(_NICENESS)
    logging.basicConfig(format="%(levelname)s: [-] %(name)s: %(message)s", level=logging.INFO)
    writer: TraceWriter | None = None
    failing = False
    for batch in _batches(traces, parent):
        try:
            writer = writer or TraceWriter(tracking_uri, experiment)
            writer.write(batch)
        except Exception as exc:  # the store's failure is counted and logged, never raised anywhere
            with counts.get_lock():
                counts[_FAILED] += len(batch)
            log.log(logging.DEBUG if failing else logging.WARNING, "traces not written: %s", exc)
            failing = True
        else:
            with counts.get_lock():
                counts[_EXPORTED] += len(batch)
            if failing:
                log.warning("traces are written again")
            failing = False


class TraceExporter(Collector):
    """The server's side: a bounded queue to the child (started at the first trace) and its counts."""

    def __init__(self, *, tracking_uri: str, experiment: str, queue_size: int) -> None:
        # spawn, not fork: the server has threads (uvicorn, the scheduler) that a fork would copy mid-step.
        self._mp = multiprocessing.get_context("spawn")
        self._uri = tracking_uri
        self._experiment = experiment
        self._queue: Any = self._mp.Queue(maxsize=queue_size)
        self._counts: Any = self._mp.Array("Q", 3)
        self._process: Any = None
        self._lock = threading.Lock()
        self._gone_warned = False

    def submit(self, trace: ServedTrace) -> None:
        """Queue `trace` for the child; a full queue (or a child that died) drops it, counted."""
        with self._lock:
            if self._process is None:
                self._process = self._mp.Process(
                    target=export_forever,
                    args=(self._queue, self._counts, self._uri, self._experiment, os.getpid()),
                    name="llmadapter-traces",
                    daemon=True,
                )
                self._process.start()
        if not self._process.is_alive() and self._process.exitcode is not None:
            self._drop(_FAILED)
            if not self._gone_warned:
                log.error("the trace exporter exited (code %s); traces are dropped", self._process.exitcode)
                self._gone_warned = True
            return
        try:
            self._queue.put_nowait(trace)
        except queue.Full:
            self._drop(_FULL)

    def _drop(self, reason: int) -> None:
        with self._counts.get_lock():
            self._counts[reason] += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the child write what is queued within `timeout_s`, then stop it."""
        if self._process is None:
            return
        with contextlib.suppress(queue.Full):  # a child that is stuck gets terminated below
            self._queue.put(None, timeout=timeout_s)
        self._process.join(timeout=timeout_s)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=timeout_s)
        self._queue.cancel_join_thread()  # what the child never read is not waited for at exit

    def collect(self) -> Iterable[Metric]:
        counts = list(self._counts)
        exported = CounterMetricFamily(
            "llmadapter_traces_exported", "Request traces written to the MLflow tracking store."
        )
        exported.add_metric([], counts[_EXPORTED])
        dropped = CounterMetricFamily(
            "llmadapter_traces_dropped",
            "Sampled request traces not written: queue_full (the exporter is behind), export_failed.",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], counts[_FULL])
        dropped.add_metric(["export_failed"], counts[_FAILED])
        depth = GaugeMetricFamily("llmadapter_trace_queue_depth", "Traces waiting for the exporter.")
        depth.add_metric([], self._queue.qsize())
        yield from (exported, dropped, depth)
