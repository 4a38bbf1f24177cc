"""The request being served: its id (X-Request-Id), its arrival, the engine work done for it, and the
logging filter that puts its id on every log line written while it is served.

A contextvar, so that whatever runs in the request's task (the route, the engine preparing the request,
uvicorn's access line, an error's log line) sees it without being handed it. The server's middleware
binds it; a generation engine adds its work (`add_work`), which observers read once the answer is out.
Outside a served request (pyfunc predict) there is none and nothing is recorded.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmadapter.engine.base import Engine
    from llmadapter.engine.formats import Job

# What a log line shows when no request is being served (start-up, the scheduler thread).
NO_REQUEST = "-"
# A client's id is kept when it is visible ASCII (safe in a header and a log line) and not too long.
_USABLE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


@dataclass(eq=False)
class RequestContext:
    """One HTTP request from arrival to its last byte; times are `time.perf_counter()` seconds."""

    id: str
    path: str = ""
    start: float = field(default_factory=time.perf_counter)
    started_ns: int = field(default_factory=time.time_ns)  # wall clock, for traces
    status: int | None = None  # the answer's status code, once its first byte went out
    streamed: bool = False  # answered as server-sent events
    end: float | None = None  # the last byte went out
    work: list[tuple[Engine, Job]] = field(default_factory=list)  # what generation engines ran for it


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "llmadapter_request", default=None
)


def current_request() -> RequestContext | None:
    """The request served in this task, or None (pyfunc, a background thread)."""
    return _current.get()


def bind(context: RequestContext) -> contextvars.Token[RequestContext | None]:
    """Make `context` the current request of this task (and of the tasks it starts) until `unbind`."""
    return _current.set(context)


def unbind(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)


def add_work(engine: Engine, job: Job) -> float:
    """Record that `engine` runs `job` for the current request; returns the request's arrival time (now,
    outside a served request), from which the engine measures its latencies."""
    context = _current.get()
    if context is None:
        return time.perf_counter()
    context.work.append((engine, job))
    return context.start


def request_id_for(given: str | None) -> str:
    """The id a request is served under: the client's X-Request-Id when usable, else a new one."""
    if given is not None and _USABLE_ID.match(given):
        return given
    return uuid.uuid4().hex


def current_id() -> str:
    context = _current.get()
    return context.id if context is not None else NO_REQUEST


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (for a `%(request_id)s` format) on every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_id()
        return True
