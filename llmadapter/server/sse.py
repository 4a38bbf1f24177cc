"""Server-sent events in OpenAI's streaming format (`data: {chunk}` lines, `data: [DONE]`, error events),
and the one streamed answer that /v1/* and /invocations both give (`stream_answer`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from llmadapter.engine.base import Engine
from llmadapter.server.context import ServerContext
from llmadapter.server.errors import ErrorAnswer, RequestTimeoutError
from llmadapter.server.lifetime import until_done

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
# Proxies (nginx) buffer responses unless told not to; a buffered stream has no time to first token.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode_chunk(chunk: BaseModel) -> bytes:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n".encode()


def encode_error(answer: ErrorAnswer) -> bytes:
    # Serialised by the model, never by hand: a quote in a message cannot break the event.
    return f"data: {answer.json()}\n\n".encode()


async def next_before(chunks: AsyncIterator[BaseModel], deadline: float, timeout_s: float) -> BaseModel:
    """The next chunk, or RequestTimeoutError once the loop-time `deadline` passes."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(chunks)
    except TimeoutError:
        raise RequestTimeoutError(timeout_s) from None


async def aclose(chunks: AsyncIterator[BaseModel]) -> None:
    """Close an engine stream: for the engine, closing the iterator is what cancels the generation."""
    close: Callable[[], Awaitable[None]] | None = getattr(chunks, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def event_stream(
    first: BaseModel,
    chunks: AsyncIterator[BaseModel],
    *,
    deadline: float,
    timeout_s: float,
    answer_error: Callable[[Exception], ErrorAnswer],
) -> AsyncIterator[bytes]:
    """SSE bytes for a stream whose first chunk the caller already fetched (so setup errors got a status).

    An error after the headers went out becomes one error event, `answer_error(exc)`, and ends the stream
    (no [DONE]), which the openai client raises as APIError. A client disconnect cancels this generator;
    `finally` then closes the engine's iterator so the generation stops.
    """
    try:
        yield encode_chunk(first)
        while True:
            try:
                chunk = await next_before(chunks, deadline, timeout_s)
            except StopAsyncIteration:
                break
            yield encode_chunk(chunk)
        yield DONE
    except Exception as exc:  # any failure mid-stream: the status line is already sent
        yield encode_error(answer_error(exc))
    finally:
        await aclose(chunks)


async def stream_answer(request: Request, ctx: ServerContext, engine: Engine, parsed: BaseModel) -> Response:
    """The SSE answer to one streamed request, holding one admission slot (and its lease on `engine`)
    until its last byte."""
    slot = AsyncExitStack()
    await slot.enter_async_context(ctx.admit(engine))
    deadline = ctx.deadline()
    timeout_s = ctx.settings.request_timeout_s
    try:
        chunks = engine.astream(parsed)
    except BaseException:
        await slot.aclose()
        raise

    async def cleanup() -> None:
        # Idempotent: it runs when the body ends and again as the response's background task.
        await aclose(chunks)
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
    events = event_stream(
        first,
        chunks,
        deadline=deadline,
        timeout_s=timeout_s,
        answer_error=lambda exc: ctx.answer_error(route, exc),
    )
    # The background task runs after the stream ends or the client leaves, even when the body
    # iterator never started.
    return StreamingResponse(
        _then(events, cleanup), media_type=MEDIA_TYPE, headers=HEADERS, background=BackgroundTask(cleanup)
    )


async def _then(stream: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    try:
        async for part in stream:
            yield part
    finally:
        await cleanup()
