"""The app factory: `build_app(engines, settings)` wires the route modules to one app with its guards.

`build_app` receives loaded engines (or names still loading) and never loads or closes a model itself:
whoever made the engines owns them (the CLI, a test fixture). Routes live in `openai_routes` (/v1/*) and
`invocations` (/invocations); this module owns what surrounds them:

- a bearer key (when the variable named by `api_key_env` is set) on /v1/* and /invocations, as a route
  dependency; /health, /ready and /metrics stay open for probes and scrapes;
- the admission bound: every generation request holds one of `max_queue` slots (`async with`), 429 with
  Retry-After past it, and with it a lease on its engine (a model swap closes an engine once no request
  holds it);
- the version header: every answer an engine with a registry version produced carries
  X-LLMAdapter-Model-Version (streams too);
- POST /webhooks/mlflow (`webhooks`): signed MLflow deliveries that make followed aliases re-resolve;
- the one error mapping: any exception a route raises becomes its OpenAI error answer, counted in the
  metrics (a stream's mid-stream error event too); a client that disconnected gets no answer (499 in
  the logs and metrics);
- the middleware that answers those exceptions and counts and times every answer to its last byte;
- the shutdown state (`app.state.shutdown`) and its middleware: 503 while draining, the answers to what
  the end of the shutdown grace cancels (`shutdown`).
- outermost, `observe.RequestIdMiddleware`: each request's X-Request-Id and context, and the observer
  that records its latency metrics and trace off the request path (closed when the app shuts down).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmadapter.engine.base import Engine
from llmadapter.errors import AuthenticationError, OverloadedError
from llmadapter.server import invocations, openai_routes, tokenizer_routes, webhooks
from llmadapter.server.context import ServerContext
from llmadapter.server.errors import ErrorAnswer, ModelLoadingError, to_error_answer
from llmadapter.server.lifetime import ClientDisconnected
from llmadapter.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llmadapter.server.metrics import ServerMetrics
from llmadapter.server.observe import Observer, RequestIdMiddleware, build_observer
from llmadapter.server.served import ServedModels
from llmadapter.server.settings import ServerSettings
from llmadapter.server.shutdown import Shutdown, ShutdownMiddleware

log = logging.getLogger("llmadapter.server")

JSON = "application/json"
# Every answer a registry version produced names it (the `model` field stays the registered name).
VERSION_HEADER = b"x-llmadapter-model-version"
# 499: nginx's "client closed request"; the answer is never read, the code is for logs and metrics.
CLIENT_CLOSED = 499


class _Admission:
    """Server-wide bound on requests in flight; past it, answer 429 at once instead of queueing forever."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, models: ServedModels) -> None:
        self.limit = settings.max_queue
        self.models = models
        self.retry_after = float(settings.retry_after_s)
        self.count = 0
        self._gauge = metrics.in_flight

    @contextlib.asynccontextmanager
    async def slot(self, engine: Engine) -> AsyncIterator[None]:
        """Hold one slot and a lease on `engine` for the body of the `async with` (OverloadedError when
        no slot is free)."""
        if self.count >= self.limit:
            raise OverloadedError(
                f"The server has {self.count} requests in flight (limit {self.limit}); retry shortly.",
                retry_after=self.retry_after,
            )
        self.count += 1
        self._gauge.inc()
        try:
            with self.models.lease(engine):
                yield
        finally:
            self.count -= 1
            self._gauge.dec()


def _key_check(settings: ServerSettings) -> Callable[[Request], Awaitable[None]]:
    """The auth dependency of /v1/* and /invocations: `Authorization: Bearer <key>` (401 otherwise)."""
    key = (settings.api_key() or "").encode()

    async def require_key(request: Request) -> None:
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        # Constant-time comparison; the key is never echoed or logged.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")

    return require_key


class _Errors:
    """The one mapping from a failure to its answer, and the one place errors are counted (route labels
    stay bounded: the app's fixed paths, and "other")."""

    def __init__(self, metrics: ServerMetrics, routes: Collection[str]) -> None:
        self.metrics = metrics
        self.routes = routes

    def route(self, path: str) -> str:
        """The metrics label of a path: itself for the app's fixed routes, else "other"."""
        return path if path in self.routes else "other"

    def answer(self, path: str, exc: BaseException) -> ErrorAnswer:
        answer = to_error_answer(exc)
        self.metrics.errors.labels(self.route(path), answer.body.error.type).inc()
        return answer

    def response(self, path: str, exc: BaseException) -> Response:
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=CLIENT_CLOSED)
        answer = self.answer(path, exc)
        return Response(
            answer.json(), status_code=answer.status_code, headers=answer.headers, media_type=JSON
        )


class _AnswerMiddleware:
    """Answers every exception a route raised, and counts and times every answer by route, model and
    status, to its last byte (streams included).

    Exceptions are answered here, not by an `Exception` handler: Starlette runs that one outside every
    middleware and re-raises after answering (a traceback in the server log for each failed request).
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, errors: _Errors) -> None:
        self.app = app
        self.metrics = metrics
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        first_event: float | None = None  # when a server-sent event answer started: its first chunk

        async def record_status(message: Message) -> None:
            nonlocal status, first_event
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = message.get("headers", [])
                version = scope.get("state", {}).get("model_version")
                if version:  # the registry version whose engine answered (streams too: set before)
                    headers = message["headers"] = [*headers, (VERSION_HEADER, str(version).encode())]
                if any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers):
                    first_event = time.perf_counter()
            await send(message)

        try:
            try:
                await self.app(scope, receive, record_status)
            except Exception as exc:
                if status is not None:  # the answer began: a stream tells its own errors
                    raise
                await self.errors.response(scope["path"], exc)(scope, receive, record_status)
        finally:
            route = self.errors.route(scope["path"])
            model = str(scope.get("state", {}).get("model", ""))
            self.metrics.requests.labels(route, model, str(status or 500)).inc()
            self.metrics.latency.labels(route, model).observe(time.perf_counter() - start)
            if first_event is not None:
                self.metrics.ttft.labels(route, model).observe(first_event - start)


# What /ready tells of each model beyond its name (swap counts are on /metrics).
_READY_FIELDS = (
    "version",
    "alias",
    "following",
    "swapping_to",
    "swap_failure",
    "alias_problem",
    "switched_at",
)


def _probes(models: ServedModels, metrics: ServerMetrics) -> APIRouter:
    """/health (liveness), /ready (every model loaded) and /metrics: open, for probes and scrapes."""
    probes = APIRouter()

    @probes.get("/health", include_in_schema=False)
    async def health() -> Response:
        return Response('{"status":"ok"}', media_type=JSON)

    @probes.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        loading = sorted(models.loading)
        if loading:
            raise ModelLoadingError(f"Models still loading: {', '.join(loading)}.")
        # Ready while every name has an engine; a failed swap is reported, the old version still answers.
        detail = {
            name: {
                **{k: getattr(state, k) for k in _READY_FIELDS if getattr(state, k) not in (None, "")},
                **({"weights": dict(weights)} if (weights := models.engines[name].weight_format) else {}),
            }
            for name, state in sorted(models.states.items())
            if name in models.engines
        }
        body = {"status": "ready", "models": sorted(models.engines), "serving": detail}
        return Response(json.dumps(body), media_type=JSON)

    @probes.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return probes


def _lifespan(
    observer: Observer, models: ServedModels
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models.bind(asyncio.get_running_loop())  # model swaps switch engines on this loop
        try:
            yield
        finally:
            models.bind(None)
            await asyncio.to_thread(observer.close)  # record what is queued; write the traces it can

    return lifespan


def build_app(
    engines: Mapping[str, Engine], settings: ServerSettings, *, loading: Collection[str] = ()
) -> FastAPI:
    """The ASGI app serving `engines`, each under its `model_name` (the key it is given must be that
    name); `loading` names models a loader will add later through `app.state.models.add(engine)` (until
    then /ready answers 503)."""
    misnamed = [
        f"{key!r} ({engine.model_name!r})" for key, engine in engines.items() if key != engine.model_name
    ]
    if misnamed:
        raise ValueError(f"Engines are served under their model_name; keys differ: {', '.join(misnamed)}.")
    models = ServedModels(engines.values(), loading)
    metrics = ServerMetrics(lambda: models.engines, lambda: models.states)
    observer = build_observer(metrics, settings)
    guarded = [Depends(_key_check(settings))]
    # The webhook route is open: MLflow cannot send our key; each delivery's signature is its guard.
    routers = [
        (openai_routes.router, guarded),
        (invocations.router, guarded),
        (_probes(models, metrics), []),
        (webhooks.router(models, settings), []),
    ]
    routers += tokenizer_routes.routers(guarded)
    # Metrics label these paths as themselves and any other path (unknown, or with a model id) "other".
    paths = (r.path for router, _ in routers for r in router.routes if isinstance(r, APIRoute))
    errors = _Errors(metrics, frozenset(path for path in paths if "{" not in path))
    app = FastAPI(
        title="llmadapter",
        summary="OpenAI-compatible server for llm/v1 MLflow models",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=_lifespan(observer, models),
    )
    for router, dependencies in routers:
        app.include_router(router, dependencies=dependencies)
    app.state.models = models  # for the loader that adds models later
    admission = _Admission(settings, metrics, models)
    app.state.context = ServerContext(models, settings, metrics, admission.slot, errors.answer)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
            what = "Unknown route" if exc.status_code == 404 else "Method not allowed"
            exc = HTTPException(exc.status_code, f"{what}: {request.method} {request.url.path}.", exc.headers)
        return errors.response(request.url.path, exc)

    # Unknown routes and wrong methods are answered by Starlette's own handlers unless replaced.
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_http_error)
    # The server's signal handler drains through app.state.shutdown; its middleware sits inside the
    # answer middleware, which answers the ShuttingDownError it raises.
    app.state.shutdown = Shutdown(settings.shutdown_grace_s)
    app.add_middleware(ShutdownMiddleware, shutdown=app.state.shutdown, answer_error=errors.answer)
    app.add_middleware(_AnswerMiddleware, metrics=metrics, errors=errors)
    app.add_middleware(RequestIdMiddleware, observer=observer)  # added last: outermost
    # Name the variable, never the key.
    guard = (
        f"bearer key from ${settings.api_key_env}"
        if settings.api_key()
        else f"open (${settings.api_key_env} unset)"
    )
    log.info(
        "serving %s; /v1 and /invocations: %s", ", ".join(sorted(models.engines)) or "no model yet", guard
    )
    return app
