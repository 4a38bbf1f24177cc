"""Where the scheduler thread sends a request's events: a queue the waiting thread or event loop drains.

`ThreadSink` is the sync face (pyfunc predict and predict_stream), `LoopSink` the async face (the
server). Both read events until every sequence of the request has finished.
"""

from __future__ import annotations

import asyncio
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from typing import NamedTuple

from llmadapter.engine.scheduler import Sequence


class Event(NamedTuple):
    """A scheduler event as the waiting side receives it."""

    seq: Sequence
    text: str  # newly released text
    finished: bool
    n_tokens: int  # tokens the sequence had when the event was raised (the scheduler keeps appending)


class Sink(ABC):
    """Called by the scheduler for each sequence's progress; counts the sequences not yet finished.

    Streams want every event; whole answers only each sequence's last one, so a waiting event loop wakes
    once per sequence rather than once per token.
    """

    def __init__(self, *, every_event: bool) -> None:
        self._every_event = every_event
        self.unfinished = 0

    def expect(self, seqs: list[Sequence]) -> None:
        self.unfinished += len(seqs)

    def __call__(self, seq: Sequence, text: str, finished: bool) -> None:
        if finished or self._every_event:
            # Counted here, on the scheduler thread: it appends the next token right after this call.
            self._put(Event(seq, text, finished, len(seq.tokens)))

    @abstractmethod
    def _put(self, event: Event) -> None: ...


class ThreadSink(Sink):
    """Events for a caller that blocks in its own thread."""

    def __init__(self, *, every_event: bool) -> None:
        super().__init__(every_event=every_event)
        self._queue: queue.Queue[Event] = queue.Queue()

    def _put(self, event: Event) -> None:
        self._queue.put(event)

    def events(self) -> Iterator[Event]:
        while self.unfinished:
            event = self._queue.get()
            self.unfinished -= event.finished
            yield event

    def wait(self) -> None:
        """Until every sequence has finished."""
        for _ in self.events():
            pass


class LoopSink(Sink):
    """Events for a caller awaiting on an event loop (handed over thread-safely)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, every_event: bool) -> None:
        super().__init__(every_event=every_event)
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def _put(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        while self.unfinished:
            event = await self._queue.get()
            self.unfinished -= event.finished
            yield event

    async def wait(self) -> None:
        """Until every sequence has finished."""
        async for _ in self.events():
            pass
