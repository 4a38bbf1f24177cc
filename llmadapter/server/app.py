"""The OpenAI-compatible ASGI app: routes, model lookup by task, auth, limits, timeouts and cancellation.

`build_app(engines, settings)` receives loaded engines (or names still loading) and never loads or
closes a model itself: whoever made the engines owns them (the CLI, a test fixture).

Model lookup: a request's `model` must be the id of a served model (404 `model_not_found` otherwise;
400 naming `model` when that model serves another task). When `model` is omitted and exactly one loaded
model serves the route's task, that model answers; OpenAI clients always send it.

Guards: a bearer key (when the variable named by `api_key_env` is set) on /v1/* and /invocations;
/health, /ready and /metrics stay open for probes and scrapes. Every generation request holds one of
`max_queue` slots (429 with Retry-After past it), must finish within `request_timeout_s` (504, or an
error event mid-stream) and is cancelled in the engine when its client disconnects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS
from llmadapter.engine.base import Engine
from llmadapter.errors import AuthenticationError, InvalidRequestError, NotFoundError, OverloadedError
from llmadapter.protocol import ModelCard, ModelList
from llmadapter.server import sse
from llmadapter.server.errors import (
    ErrorAnswer,
    ModelLoadingError,
    PayloadTooLargeError,
    RequestTimeoutError,
    invalid_json,
    to_error_answer,
)
from llmadapter.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llmadapter.server.metrics import ServerMetrics
from llmadapter.server.settings import ServerSettings

log = logging.getLogger("llmadapter.server")

JSON = "application/json"
# Route of each llm/v1 task; a model answers only the route of its own task.
TASK_ROUTES: dict[str, str] = {
    CHAT: "/v1/chat/completions",
    COMPLETIONS: "/v1/completions",
    EMBEDDINGS: "/v1/embeddings",
}
INVOCATIONS = "/invocations"
_KNOWN_ROUTES = frozenset({*TASK_ROUTES.values(), INVOCATIONS, "/v1/models", "/health", "/ready", "/metrics"})
# The keys `mlflow models serve` accepts on /invocations (mlflow.pyfunc.scoring_server).
_MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
# A body holding one of these is an unwrapped OpenAI request (mlflow's "unified LLM input").
_LLM_KEYS = ("messages", "prompt", "input")
# 499: nginx's "client closed request"; the answer is never read, the code is for logs and metrics.
CLIENT_CLOSED = 499

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its generation has been cancelled."""


class ServedModels:
    """The models one app answers for: loaded engines by id, and ids whose engines are still loading."""

    def __init__(self, engines: Mapping[str, Engine], loading: Collection[str] = ()) -> None:
        self._engines: dict[str, Engine] = dict(engines)
        self._loading: set[str] = set(loading) - set(engines)

    def add(self, name: str, engine: Engine) -> None:
        """Serve a freshly loaded engine (called from a loader thread: plain dict/set updates only)."""
        self._engines[name] = engine
        self._loading.discard(name)

    @property
    def engines(self) -> Mapping[str, Engine]:
        return self._engines

    @property
    def loading(self) -> frozenset[str]:
        return frozenset(self._loading)

    def _names(self) -> str:
        return ", ".join(sorted(self._engines)) or "none"

    def get(self, name: object) -> tuple[str, Engine]:
        """The loaded model called `name` (any task)."""
        if not isinstance(name, str):
            raise InvalidRequestError("Invalid value for 'model': must be a string.", param="model")
        engine = self._engines.get(name)
        if engine is not None:
            return name, engine
        if name in self._loading:
            raise ModelLoadingError(f"The model '{name}' is still loading; retry shortly.")
        raise NotFoundError(
            f"The model '{name}' does not exist on this server. Served models: {self._names()}.",
            param="model",
            code="model_not_found",
        )

    def for_task(self, name: object, task: str) -> tuple[str, Engine]:
        """The model that answers a request for `task` naming `name` (None: the only model of that task)."""
        if name is not None:
            name, engine = self.get(name)
            if engine.inference_task != task:
                route = TASK_ROUTES.get(engine.inference_task, engine.inference_task)
                raise InvalidRequestError(
                    f"The model '{name}' serves {engine.inference_task} (at {route}), not {task}.",
                    param="model",
                    code="wrong_task",
                )
            return name, engine
        matches = [(n, e) for n, e in self._engines.items() if e.inference_task == task]
        if self._loading:
            raise ModelLoadingError("Models are still loading; name one in 'model' or retry shortly.")
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InvalidRequestError(
                f"Several models serve {task}; name one in 'model': {', '.join(n for n, _ in matches)}.",
                param="model",
            )
        raise NotFoundError(
            f"No model on this server serves {task}. Served models: {self._names()}.",
            param="model",
            code="model_not_found",
        )

    def only(self) -> tuple[str, Engine]:
        """The single served model (for /invocations requests that name none)."""
        if self._loading:
            raise ModelLoadingError("Models are still loading; retry shortly.")
        if len(self._engines) != 1:
            raise InvalidRequestError(
                f"This server serves several models; name one in 'model': {self._names()}.", param="model"
            )
        return next(iter(self._engines.items()))


class _Admission:
    """Server-wide bound on requests in flight; past it, answer 429 at once instead of queueing forever."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.limit = settings.max_queue
        self.retry_after = float(settings.retry_after_s)
        self.count = 0
        self._gauge = metrics.in_flight

    def acquire(self) -> Callable[[], None]:
        """Take a slot; returns its release function (safe to call more than once)."""
        if self.count >= self.limit:
            raise OverloadedError(
                f"The server has {self.count} requests in flight (limit {self.limit}); retry shortly.",
                retry_after=self.retry_after,
            )
        self.count += 1
        self._gauge.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.count -= 1
                self._gauge.dec()

        return release


class _MetricsMiddleware:
    """Counts every answer by route, model and status, and times it to its last byte (streams included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope["path"] if scope["path"] in _KNOWN_ROUTES else "other"
            model = str(scope.get("state", {}).get("model", ""))
            self.metrics.requests.labels(route, model, str(status)).inc()
            self.metrics.latency.labels(route, model).observe(time.perf_counter() - start)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body: at most `limit` bytes (413), however it is sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:  # chunked bodies declare no length
            raise PayloadTooLargeError(limit)
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: at most `limit` bytes (413), strict UTF-8, no NaN/Infinity (400)."""
    return parse_json(await read_body(request, limit))


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        _check_text(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid_json(exc) from None
    return data


def _check_text(value: Any) -> None:
    """Refuse lone surrogates ("\\ud800"): valid JSON escapes, but no text, and tokenizers choke on them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


async def _wait_disconnect(receive: Receive) -> None:
    # Once the body is read, the server's receive() blocks until the client goes away.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_done(request: Request, work: Awaitable[T], deadline: float, timeout_s: float) -> T:
    """Await `work`, cancelling it when the client disconnects (ClientDisconnected) or time runs out."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        loop = asyncio.get_running_loop()
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        if watcher in done:
            raise ClientDisconnected()
        raise RequestTimeoutError(timeout_s)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        # Let the engine see its cancellation before the slot is released.
        await asyncio.gather(task, watcher, return_exceptions=True)


def _json_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(exclude_none=True), status_code=status_code, media_type=JSON)


class _Api:
    """The request handling of one app; build_app wires its methods to routes."""

    def __init__(self, models: ServedModels, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.admission = _Admission(settings, metrics)
        self._key = settings.api_key()
        self._key_bytes = self._key.encode() if self._key else b""

    # -- shared steps --------------------------------------------------------------------------

    def error_response(self, request: Request, exc: BaseException) -> Response:
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=CLIENT_CLOSED)
        answer = to_error_answer(exc)
        self._count_error(request.url.path, answer)
        return Response(
            answer.json(), status_code=answer.status_code, headers=answer.headers, media_type=JSON
        )

    def _count_error(self, path: str, answer: ErrorAnswer) -> None:
        route = path if path in _KNOWN_ROUTES else "other"
        self.metrics.errors.labels(route, answer.body.error.type).inc()

    def check_key(self, request: Request) -> None:
        if not self._key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        # Constant-time comparison; the key is never echoed or logged.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key_bytes):
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    # -- /v1 task routes ------------------------------------------------------------------------

    async def task_route(self, request: Request, task: str) -> Response:
        try:
            self.check_key(request)
            raw = await read_json(request, self.settings.max_body_bytes)
            if not isinstance(raw, dict):
                raise InvalidRequestError(
                    f"The request body must be a JSON object, got {type(raw).__name__}."
                )
            name, engine = self.models.for_task(raw.get("model"), task)
            request.state.model = name
            parsed = engine.parse(raw, strict=True)  # JSON types as OpenAI checks them
            release: Callable[[], None] | None = self.admission.acquire()
        except Exception as exc:
            return self.error_response(request, exc)
        try:
            if getattr(parsed, "stream", None):
                assert release is not None
                response = await self._stream(request, name, engine, parsed, release)
                release = None  # the stream releases its slot when it ends
                return response
            result: Any = await _until_done(
                request, engine.arun(parsed), self._deadline(), self.settings.request_timeout_s
            )
            result.model = name
            return _json_response(result)
        except Exception as exc:
            return self.error_response(request, exc)
        finally:
            if release is not None:
                release()

    async def _stream(
        self, request: Request, name: str, engine: Engine, parsed: BaseModel, release: Callable[[], None]
    ) -> Response:
        start = time.perf_counter()
        deadline = self._deadline()
        timeout_s = self.settings.request_timeout_s
        chunks = engine.astream(parsed)

        async def first_chunk() -> BaseModel | None:
            try:
                return await anext(chunks)
            except StopAsyncIteration:
                return None

        try:
            # The first chunk is awaited here, before any header is sent, so that a full queue, a
            # too-long prompt or a timeout still gets its own HTTP status.
            first = await _until_done(request, first_chunk(), deadline, timeout_s)
        except BaseException:
            await sse.aclose(chunks)
            raise
        if first is None:
            await sse.aclose(chunks)
            raise RuntimeError("the engine's stream ended without a chunk")
        route = request.url.path
        self.metrics.ttft.labels(route, name).observe(time.perf_counter() - start)

        async def cleanup() -> None:
            release()
            await sse.aclose(chunks)

        def rename(chunk: BaseModel) -> None:
            chunk.model = name  # type: ignore[attr-defined]

        body = _finally(
            sse.event_stream(
                first,
                chunks,
                deadline=deadline,
                timeout_s=timeout_s,
                on_chunk=rename,
                on_error=lambda answer: self._count_error(route, answer),
            ),
            cleanup,
        )
        # The background task runs after the stream ends or the client leaves, even when the body
        # iterator never started; cleanup is idempotent.
        return StreamingResponse(
            body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS, background=BackgroundTask(cleanup)
        )

    # -- /invocations ---------------------------------------------------------------------------

    async def invocations(self, request: Request) -> Response:
        try:
            self.check_key(request)
            body = await read_body(request, self.settings.max_body_bytes)
            if request.headers.get("content-type", "").split(";")[0].strip().lower() == "text/csv":
                rows, wrapped = csv_rows(body), True  # as mlflow models serve: one request per CSV row
            else:
                rows, wrapped = split_invocation(parse_json(body))
            requested = [row.get("model") for row in rows]
            if any(m is not None and not isinstance(m, str) for m in requested):
                raise InvalidRequestError("Invalid value for 'model': must be a string.", param="model")
            names = set(requested) - {None}
            if len(names) > 1:
                raise InvalidRequestError(
                    "All rows of one invocation must name the same 'model'.", param="model"
                )
            name, engine = self.models.get(names.pop()) if names else self.models.only()
            request.state.model = name
            parsed = [engine.parse(row) for row in pyfunc_rows(rows, engine.inference_task)]
            release = self.admission.acquire()
        except Exception as exc:
            return self.error_response(request, exc)
        try:
            results: list[Any] = await _until_done(
                request,
                _all_or_none([engine.arun(item) for item in parsed]),
                self._deadline(),
                self.settings.request_timeout_s,
            )
            predictions = []
            for result in results:
                result.model = name
                predictions.append(result.model_dump(mode="json", exclude_none=True))
            # One request answers one object, several a list: what our pyfunc's predict returns.
            payload: Any = predictions[0] if len(predictions) == 1 else predictions
            if wrapped:
                payload = {"predictions": payload}
            return Response(json.dumps(payload, ensure_ascii=False), media_type=JSON)
        except Exception as exc:
            return self.error_response(request, exc)
        finally:
            release()

    # -- plain routes ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        try:
            self.check_key(request)
        except Exception as exc:
            return self.error_response(request, exc)
        cards = [ModelCard(id=n, task=e.inference_task) for n, e in sorted(self.models.engines.items())]
        return _json_response(ModelList(data=cards))

    async def get_model(self, request: Request, model_id: str) -> Response:
        try:
            self.check_key(request)
            name, engine = self.models.get(model_id)
        except Exception as exc:
            return self.error_response(request, exc)
        return _json_response(ModelCard(id=name, task=engine.inference_task))

    async def ready(self, request: Request) -> Response:
        loading = sorted(self.models.loading)
        if loading:
            return self.error_response(
                request, ModelLoadingError(f"Models still loading: {', '.join(loading)}.")
            )
        return Response(
            json.dumps({"status": "ready", "models": sorted(self.models.engines)}), media_type=JSON
        )


async def _all_or_none(calls: list[Awaitable[Any]]) -> list[Any]:
    """Results of all `calls` run together; the first failure cancels the others (no orphan generations
    still using the batch after the answer went out)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        # Let each cancelled row reach the engine (scheduler.cancel) before the caller frees its slot.
        await asyncio.gather(*tasks, return_exceptions=True)


async def _finally(
    stream: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    try:
        async for part in stream:
            yield part
    finally:
        await cleanup()


def split_invocation(raw: Any) -> tuple[list[dict[str, Any]], bool]:
    """The OpenAI requests in an /invocations body, and whether the answer is wrapped in "predictions".

    Accepts what `mlflow models serve` accepts for JSON: `dataframe_split`, `dataframe_records`,
    `instances`, `inputs` (answered as {"predictions": [...]}, one per row; an optional `params` object
    fills fields a row leaves out), or a plain OpenAI request body (answered unwrapped, as mlflow does for
    its "unified LLM input"). A null cell means "not given", as pandas writes missing values.
    """
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"The request body must be a JSON object, got {type(raw).__name__}.")
    formats = [key for key in _MLFLOW_FORMATS if key in raw]
    if not formats:
        if any(key in raw for key in _LLM_KEYS):
            return [raw], False
        raise InvalidRequestError(
            "The body must hold exactly one of "
            f"{', '.join(_MLFLOW_FORMATS)}, or be an OpenAI request (with {', '.join(_LLM_KEYS)})."
        )
    extra = set(raw) - {formats[0], "params"}
    if len(formats) > 1 or extra:
        raise InvalidRequestError(
            f"The body must hold exactly one of {', '.join(_MLFLOW_FORMATS)} (and optionally 'params'); "
            f"got {', '.join(sorted(raw))}.",
            param=formats[-1] if len(formats) > 1 else sorted(extra)[0],
        )
    key = formats[0]
    rows = _rows(key, raw[key])
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("Invalid value for 'params': must be an object.", param="params")
    if not rows:
        raise InvalidRequestError(f"Invalid value for '{key}': no rows.", param=key)
    return [{**params, **{k: v for k, v in row.items() if v is not None}} for row in rows], True


_CSV_TEXT = ("prompt", "input", "model", "stop", "user", "suffix", "encoding_format")


def csv_rows(body: bytes) -> list[dict[str, Any]]:
    """The rows of a `text/csv` /invocations body, read as `mlflow models serve` reads it (pandas); an
    empty cell means "not given"."""
    import io

    import pandas as pd

    from llmadapter.rows import plain_rows

    try:
        # Text columns stay text ("42" is a prompt, not a number), as the signature's types make MLflow read
        # them; the numeric parameters are inferred.
        frame = pd.read_csv(io.StringIO(body.decode("utf-8")), dtype=dict.fromkeys(_CSV_TEXT, str))
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequestError(f"The body is not valid CSV: {detail}", code="invalid_csv") from None
    if frame.empty:
        raise InvalidRequestError("The CSV body has a header but no rows.", code="invalid_csv")
    return plain_rows(frame)


def pyfunc_rows(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Rows as our pyfunc `predict` reads them, so /invocations answers as `mlflow models serve` does:
    `stream` and `stream_options` are dropped (predict answers whole), and embeddings rows holding only
    `input` are one request (MLflow's schema enforcement splits a list of texts into one row per text)."""
    rows = [{k: v for k, v in row.items() if k not in ("stream", "stream_options")} for row in rows]
    if task == EMBEDDINGS and len(rows) > 1 and all(set(row) <= {"input", "model"} for row in rows):
        rows = [{**rows[0], "input": [row.get("input") for row in rows]}]
    return rows


def _rows(key: str, value: Any) -> list[dict[str, Any]]:
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
            raise InvalidRequestError(
                'Invalid value for \'dataframe_split\': expected {"columns": [...], "data": [[...], ...]}.',
                param=key,
            )
        columns, data = value["columns"], value.get("data")
        if not isinstance(data, list) or not all(
            isinstance(r, list) and len(r) == len(columns) for r in data
        ):
            raise InvalidRequestError(
                "Invalid value for 'dataframe_split.data': every row must be a list as long as 'columns'.",
                param=f"{key}.data",
            )
        if not all(isinstance(c, str) for c in columns):
            raise InvalidRequestError(
                "Invalid value for 'dataframe_split.columns': names must be strings.", param=f"{key}.columns"
            )
        return [dict(zip(columns, r, strict=True)) for r in data]
    if isinstance(value, dict):
        if key == "inputs" and _is_columnar(value):
            size = len(next(iter(value.values())))
            return [{col: cells[i] for col, cells in value.items()} for i in range(size)]
        return [value]
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        return list(value)
    raise InvalidRequestError(f"Invalid value for '{key}': expected a list of objects.", param=key)


def _is_columnar(value: dict[str, Any]) -> bool:
    """{"messages": [[...], [...]], "max_tokens": [5, 7]}: every column a list of the same length, and
    chat messages given per row (a list of message lists)."""
    if not value or not all(isinstance(v, list) for v in value.values()):
        return False
    if len({len(v) for v in value.values()}) != 1:
        return False
    messages = value.get("messages")
    return messages is None or all(isinstance(m, list) for m in messages)


def _task_endpoint(api: _Api, task: str) -> Callable[[Request], Awaitable[Response]]:
    # A closure, not a default argument: FastAPI would expose a defaulted parameter as a query field.
    async def endpoint(request: Request) -> Response:
        return await api.task_route(request, task)

    return endpoint


def build_app(
    engines: Mapping[str, Engine], settings: ServerSettings, *, loading: Collection[str] = ()
) -> FastAPI:
    """The ASGI app serving `engines` by id; `loading` names models a loader will add later through
    `app.state.models.add(name, engine)` (until then /ready answers 503)."""
    models = ServedModels(engines, loading)
    metrics = ServerMetrics(lambda: models.engines)
    api = _Api(models, settings, metrics)
    app = FastAPI(
        title="llmadapter",
        summary="OpenAI-compatible server for llm/v1 MLflow models",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.models = models
    app.state.metrics = metrics
    app.state.settings = settings

    async def on_http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
            what = "Unknown route" if exc.status_code == 404 else "Method not allowed"
            exc = HTTPException(exc.status_code, f"{what}: {request.method} {request.url.path}.", exc.headers)
        return api.error_response(request, exc)

    # Unknown routes, wrong methods and anything that escapes a handler still answer in OpenAI form.
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_http_error)
    app.add_exception_handler(Exception, on_http_error)

    for task, path in TASK_ROUTES.items():
        app.add_api_route(path, _task_endpoint(api, task), methods=["POST"], include_in_schema=False)

    app.add_api_route(INVOCATIONS, api.invocations, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/models", api.list_models, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models/{model_id:path}", api.get_model, methods=["GET"], include_in_schema=False)

    async def health() -> Response:
        return Response('{"status":"ok"}', media_type=JSON)

    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ready", api.ready, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", metrics_route, methods=["GET"], include_in_schema=False)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    # Name the variable, never the key.
    guard = (
        f"bearer key from ${settings.api_key_env}" if api._key else f"open (${settings.api_key_env} unset)"
    )
    log.info(
        "serving %s; /v1 and /invocations: %s", ", ".join(sorted(models.engines)) or "no model yet", guard
    )
    return app
