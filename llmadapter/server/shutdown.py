"""Graceful shutdown on SIGTERM and SIGINT: drain, a bounded grace, cancel the rest; a second signal exits.

uvicorn's own handling (`Server.capture_signals`, `handle_exit`) re-raises the caught signal once it has
shut down, so the process dies of it (-15) before the CLI closes its engines, and at the end of
`timeout_graceful_shutdown` it cancels what still runs with a traceback and a plain-text 500. Here:

- the first signal starts draining: uvicorn stops accepting connections and closes idle ones, and a
  request that still reaches the app gets a 503 `shutting_down` (/health and /metrics keep answering);
- requests in flight, streams included, finish within `shutdown_grace_s`; at its end the rest are
  cancelled in the engine and answered: a 503 before the answer began, an error event mid-stream;
- uvicorn returns and the caller closes its engines and exits 0;
- a second signal exits at once with 128 + its number (143 for SIGTERM, 130 for SIGINT). One that comes
  within `SAME_STOP_S` of the first is the same stop delivered twice (a process-group or cgroup kill that
  reached this process and its parent, which forwards it) and is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmadapter.errors import LLMAdapterError
from llmadapter.server import sse
from llmadapter.server.errors import ErrorAnswer

log = logging.getLogger("llmadapter.server")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A signal this soon after the first is the same stop delivered twice, not a person insisting.
SAME_STOP_S = 1.0
# After the grace, how long the cancelled requests' answers may take to go out before uvicorn itself
# cancels whatever is left.
ANSWER_MARGIN_S = 5.0
# Probes and scrapes keep answering while the server drains: the process is alive, just leaving.
_OPEN_WHILE_DRAINING = frozenset({"/health", "/metrics"})


class ShuttingDownError(LLMAdapterError):
    """503: the server is stopping (the request came during the drain, or outlived the grace)."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="shutting_down")


class Shutdown:
    """One app's shutdown: `begin()` from the signal handler, `cancel_in_flight()` when the grace ends."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def begin(self) -> None:
        self.draining = True

    def cancel_in_flight(self) -> int:
        """Cancel every request still running; each is answered by the middleware. Returns how many."""
        for work in self._in_flight:
            work.cancel()
        return len(self._in_flight)

    @contextlib.contextmanager
    def tracking(self, work: asyncio.Task[None]) -> Iterator[None]:
        self._in_flight.add(work)
        try:
            yield
        finally:
            self._in_flight.discard(work)


class ShutdownMiddleware:
    """Refuses requests while draining and answers the ones cancelled at the end of the grace.

    Inside the app's answer middleware: a ShuttingDownError raised here becomes the 503 OpenAI error
    answer there, counted like any other.
    """

    def __init__(
        self, app: ASGIApp, shutdown: Shutdown, answer_error: Callable[[str, BaseException], ErrorAnswer]
    ) -> None:
        self.app = app
        self.shutdown = shutdown
        self.answer_error = answer_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_WHILE_DRAINING:
            await self.app(scope, receive, send)
            return
        if self.shutdown.draining:
            raise ShuttingDownError("The server is shutting down; send the request to another replica.")
        media_type: str | None = None  # set once the answer has begun

        async def watch(message: Message) -> None:
            nonlocal media_type
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0]
            await send(message)

        # Its own task, so that the end of the grace can cancel the work and still answer here.
        work = asyncio.ensure_future(self.app(scope, receive, watch))
        with self.shutdown.tracking(work):
            try:
                await work
                return
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not work.cancelled() or (current is not None and current.cancelling()):
                    raise  # this request itself was cancelled (the server's own timeout), not its work
        late = ShuttingDownError(
            f"The server shut down before the request finished (shutdown grace {self.shutdown.grace_s:g} s)."
        )
        if media_type != sse.MEDIA_TYPE:
            # Not begun: the 503 answer. A whole answer cut while being sent: nothing valid can follow.
            raise late
        event = sse.encode_error(self.answer_error(scope["path"], late))
        await send({"type": "http.response.body", "body": event, "more_body": False})


class GracefulServer(uvicorn.Server):
    """uvicorn's Server with the shutdown above (signals are only caught on the main thread)."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        # uvicorn's own limit stays as the backstop, after the answers to what the grace cancelled.
        config.timeout_graceful_shutdown = math.ceil(shutdown.grace_s + ANSWER_MARGIN_S)
        super().__init__(config)
        self.drain = shutdown
        self._first_signal_at: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Unlike uvicorn's, re-raises nothing afterwards: the signal is handled, the caller exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            self.drain.begin()
            self.should_exit = True
            log.info(
                "%s: refusing new requests; %d in flight get up to %g s to finish (a second signal exits)",
                name,
                self.drain.in_flight,
                self.drain.grace_s,
            )
        elif now - self._first_signal_at >= SAME_STOP_S:
            log.warning("second %s: exiting now with %d request(s) in flight", name, self.drain.in_flight)
            os._exit(128 + sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain.grace_s, self._end_grace)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_grace(self) -> None:
        cancelled = self.drain.cancel_in_flight()
        if cancelled:
            log.warning(
                "shutdown grace of %g s is over: cancelled %d request(s)", self.drain.grace_s, cancelled
            )
