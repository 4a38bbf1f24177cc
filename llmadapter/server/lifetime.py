"""How long a request's work lives: until its answer, its client's disconnect or its deadline, whichever
comes first; work that outlives its request is cancelled in the engine, never left generating."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from llmadapter.server.errors import RequestTimeoutError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its generation has been cancelled."""


async def _wait_disconnect(receive: Receive) -> None:
    # Once the body is read, the server's receive() blocks until the client goes away.
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_done(request: Request, work: Awaitable[T], deadline: float, timeout_s: float) -> T:
    """Await `work`, cancelling it when the client disconnects (ClientDisconnected) or the loop-time
    `deadline` passes (RequestTimeoutError naming `timeout_s`)."""
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


async def all_or_none(calls: list[Awaitable[Any]]) -> list[Any]:
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
