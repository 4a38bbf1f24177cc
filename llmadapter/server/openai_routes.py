"""The OpenAI routes: one POST route per catalog task (answered whole or streamed), and /v1/models.

Handlers raise: every failure is an exception that the app's one error mapping turns into an OpenAI error
answer (or, once a stream has started, into its last event).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from llmadapter.catalog import CATALOG, TaskSpec
from llmadapter.engine.base import Engine
from llmadapter.protocol import ModelCard, ModelList
from llmadapter.server import sse
from llmadapter.server.body import read_object
from llmadapter.server.context import Context, ServerContext
from llmadapter.server.lifetime import until_done

JSON = "application/json"

router = APIRouter()


def _json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type=JSON)


async def _answer(request: Request, ctx: ServerContext, spec: TaskSpec) -> Response:
    raw = await read_object(request, ctx.settings.max_body_bytes)
    engine = ctx.models.for_task(raw.get("model"), spec.inference_task)
    request.state.model = engine.model_name  # the metrics label
    parsed = engine.parse(raw, strict=True)  # JSON types as OpenAI checks them
    async with AsyncExitStack() as slot:
        await slot.enter_async_context(ctx.admit())
        if getattr(parsed, "stream", None):
            # The stream holds its slot until its last byte; it releases it itself.
            return await _stream(request, ctx, engine, parsed, slot.pop_all())
        result = await until_done(
            request, engine.arun(parsed), ctx.deadline(), ctx.settings.request_timeout_s
        )
    return _json_response(result)


async def _stream(
    request: Request, ctx: ServerContext, engine: Engine, parsed: BaseModel, slot: AsyncExitStack
) -> Response:
    start = time.perf_counter()
    deadline = ctx.deadline()
    timeout_s = ctx.settings.request_timeout_s
    chunks = engine.astream(parsed)

    async def cleanup() -> None:
        # Idempotent: it runs when the body ends and again as the response's background task.
        await sse.aclose(chunks)
        await slot.aclose()

    try:
        # The first chunk is awaited here, before any header is sent, so that a full queue, a
        # too-long prompt or a timeout still gets its own HTTP status.
        first = await until_done(request, anext(chunks, None), deadline, timeout_s)
        if first is None:
            raise RuntimeError("the engine's stream ended without a chunk")
    except BaseException:
        await cleanup()
        raise
    route = request.url.path
    ctx.metrics.ttft.labels(route, engine.model_name).observe(time.perf_counter() - start)
    events = sse.event_stream(
        first,
        chunks,
        deadline=deadline,
        timeout_s=timeout_s,
        answer_error=lambda exc: ctx.answer_error(route, exc),
    )
    # The background task runs after the stream ends or the client leaves, even when the body
    # iterator never started.
    return StreamingResponse(
        _then(events, cleanup),
        media_type=sse.MEDIA_TYPE,
        headers=sse.HEADERS,
        background=BackgroundTask(cleanup),
    )


async def _then(stream: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    try:
        async for part in stream:
            yield part
    finally:
        await cleanup()


def _task_endpoint(spec: TaskSpec) -> Callable[[Request, ServerContext], Awaitable[Response]]:
    # A closure, not a default argument: FastAPI would expose a defaulted parameter as a query field.
    async def endpoint(request: Request, ctx: Context) -> Response:
        return await _answer(request, ctx, spec)

    return endpoint


for _spec in CATALOG.values():
    router.add_api_route(_spec.route, _task_endpoint(_spec), methods=["POST"], include_in_schema=False)


@router.get("/v1/models", include_in_schema=False)
async def list_models(ctx: Context) -> Response:
    cards = [ModelCard(id=n, task=e.inference_task) for n, e in sorted(ctx.models.engines.items())]
    return _json_response(ModelList(data=cards))


@router.get("/v1/models/{model_id:path}", include_in_schema=False)
async def get_model(model_id: str, ctx: Context) -> Response:
    engine = ctx.models.get(model_id)
    return _json_response(ModelCard(id=engine.model_name, task=engine.inference_task))
