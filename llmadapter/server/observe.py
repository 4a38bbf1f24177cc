"""What each HTTP request leaves behind: its X-Request-Id, and once answered, its latency metrics and trace.

`RequestIdMiddleware`, the app's outermost middleware, gives each request its id (the client's
X-Request-Id when usable, else a new one), binds its RequestContext for everything that runs in the
request's task (routes, the engine preparing it, log lines) and puts the id on the answer, streams and
errors alike. Once the last byte is out it hands the context to the `Observer`, whose thread turns the
engine's timestamps into the per-request histograms and samples traces for the exporter: the request
path itself only enqueues.
"""

from __future__ import annotations

import copy
import logging
import queue
import random
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmadapter.engine.base import WorkerThread
from llmadapter.request_context import RequestContext, bind, request_id_for, unbind
from llmadapter.server.metrics import ServerMetrics
from llmadapter.server.settings import ServerSettings
from llmadapter.server.trace_exporter import TraceExporter
from llmadapter.server.tracing import served_trace

log = logging.getLogger("llmadapter.server")

HEADER = "x-request-id"
_SSE = b"text/event-stream"


class Observer:
    """Records answered requests on its own thread: histograms always, a trace when sampled."""

    def __init__(
        self, metrics: ServerMetrics, settings: ServerSettings, tracer: TraceExporter | None
    ) -> None:
        self._metrics = metrics
        self._request_metrics = settings.request_metrics
        self._tracer = tracer
        self._sample_rate = settings.tracing_sample_rate
        self._include_text = settings.tracing_include_text
        self._queue: queue.SimpleQueue[RequestContext | None] = queue.SimpleQueue()
        self._worker = WorkerThread(self._run, "llmadapter-observer")

    @property
    def active(self) -> bool:
        return self._request_metrics or self._tracer is not None

    def submit(self, context: RequestContext) -> None:
        self._queue.put(context)
        self._worker.start_once()

    def close(self) -> None:
        """Record what is queued, then stop; the tracer writes what it holds."""
        self._queue.put(None)
        self._worker.join()
        if self._tracer is not None:
            self._tracer.close()

    def _run(self) -> None:
        while (context := self._queue.get()) is not None:
            try:
                self._observe(context)
            except Exception:  # a recording bug must not stop the recording of later requests
                log.exception("could not record request %s", context.id)

    def _observe(self, context: RequestContext) -> None:
        if self._request_metrics:
            now = time.perf_counter()
            for engine, job in context.work:
                for seq in job.seqs:
                    self._metrics.observe_sequence(engine, seq, now)
        if self._tracer is not None and random.random() < self._sample_rate:
            trace = served_trace(context, self._include_text)
            if trace is not None:
                self._tracer.submit(trace)


class RequestIdMiddleware:
    """Binds each HTTP request's RequestContext and X-Request-Id; hands the answered request on."""

    def __init__(self, app: ASGIApp, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER.encode()), None)
        context = RequestContext(request_id_for(given.decode("latin-1") if given is not None else None))
        context.path = scope["path"]
        header = (HEADER.encode(), context.id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                context.status = int(message["status"])
                context.streamed = any(k == b"content-type" and v.startswith(_SSE) for k, v in headers)
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = bind(context)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            context.end = time.perf_counter()
            unbind(token)
            if context.work and self.observer.active:
                self.observer.submit(context)


def build_observer(metrics: ServerMetrics, settings: ServerSettings) -> Observer:
    """The app's observer; with tracing on, its exporter writes to MLflow's current tracking URI."""
    tracer = None
    if settings.tracing:
        import mlflow

        uri = mlflow.get_tracking_uri()
        tracer = TraceExporter(
            tracking_uri=uri, experiment=settings.tracing_experiment, queue_size=settings.tracing_queue_size
        )
        metrics.registry.register(tracer)  # its counts, read at scrape time
        log.info("tracing %.0f%% of requests to %s", settings.tracing_sample_rate * 100, _shown(uri))
    return Observer(metrics, settings, tracer)


def _shown(uri: str) -> str:
    """`uri` as a log line may show it: without the user and password a URL may carry."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config with every line showing its request id (`-` outside a request), for
    uvicorn's own loggers and, through the root logger, for llmadapter's."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "llmadapter.request_context.RequestIdFilter"}}
    formats = config["formatters"]
    formats["app"] = {**formats["default"], "fmt": "%(levelprefix)s [%(request_id)s] %(name)s: %(message)s"}
    formats["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    access = '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    formats["access"]["fmt"] = access
    config["handlers"]["app"] = {**config["handlers"]["default"], "formatter": "app"}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    root_level = "DEBUG" if level.lower() == "trace" else level.upper()
    config["loggers"][""] = {"handlers": ["app"], "level": root_level}
    return config
