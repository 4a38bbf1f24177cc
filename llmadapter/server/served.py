"""The models one app answers for, by their engines' `model_name`, and how a request picks one.

A request's `model` must be the name of a served model (404 `model_not_found` otherwise; 400 naming
`model` when that model serves another task). When `model` is omitted and exactly one loaded model
serves the route's task, that model answers; OpenAI clients always send it.

A served name can change engines while the app runs (a new registry version, `llmadapter.swap`):
`switch` puts the new engine under the name; requests that picked the old one finish on it. Each
request holds a *lease* on its engine from admission to its last byte (`lease`, entered by the app's
admission slot), and the old engine is closed once its leases are gone. Picking an engine and taking its
lease happen on the event loop with no `await` between them (the routes are written so), and `switch`
runs on the event loop too: so once a switch is done, nothing can lease the old engine any more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from llmadapter.engine.base import Engine
from llmadapter.errors import InvalidRequestError, NotFoundError
from llmadapter.server.errors import ModelLoadingError, RequestTimeoutError

T = TypeVar("T")


@dataclass
class ServingState:
    """Where a served name's engine came from and how following its alias goes (/v1/models, /ready)."""

    version: str = ""  # the registry version answering now ("" for a run or a folder)
    alias: str | None = None  # the alias followed (models:/NAME@ALIAS), else None
    following: bool = False  # the alias is re-resolved (alias_poll_s > 0 or webhooks)
    swapping_to: str | None = None  # a version being loaded and warmed now
    swap_failure: str | None = None  # why the last swap failed; cleared by the next successful one
    alias_problem: str | None = None  # the alias is gone, or the registry did not answer
    swaps: int = 0  # versions switched to after the first
    swap_failures: int = 0  # versions that failed to load, warm or answer the smoke request
    swap_refusals: int = 0  # versions refused before loading (validation failed, another task)
    swap_seconds: float | None = None  # the last swap: from deciding to swap to the switch
    switched_at: float | None = None  # unix time of the last switch


class ServedModels:
    """Loaded engines by their `model_name`, names whose engines are still loading, and their leases."""

    def __init__(self, engines: Iterable[Engine] = (), loading: Collection[str] = ()) -> None:
        self._engines: dict[str, Engine] = {engine.model_name: engine for engine in engines}
        self._loading: set[str] = set(loading) - set(self._engines)
        self._states: dict[str, ServingState] = {
            name: ServingState(version=engine.model_version) for name, engine in self._engines.items()
        }
        self._leases: dict[int, int] = {}  # id(engine) -> requests holding it
        self._paused: dict[str, asyncio.Event] = {}  # names that admit nothing until set
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # (registered name, alias) -> (served name, what re-resolves it now): the webhook's targets.
        self._watchers: dict[tuple[str, str], list[tuple[str, Callable[[], None]]]] = {}

    # -- the loop the app runs on: switches happen there ---------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The event loop serving requests (set at app startup, None at shutdown)."""
        self._loop = loop

    def on_loop(self, call: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `call` on the app's event loop and return its result (directly when there is no loop
        running, or when called from the loop's own thread)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return call()
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                return call()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=timeout)

    # -- what is served ------------------------------------------------------------------------------

    def add(self, engine: Engine) -> None:
        """Serve a freshly loaded engine (called from a loader thread: plain dict/set updates only)."""
        self._engines[engine.model_name] = engine
        self._loading.discard(engine.model_name)
        self.state(engine.model_name).version = engine.model_version

    def switch(self, engine: Engine) -> Engine | None:
        """Serve `engine` under its name from now on; returns the engine it replaces (still open: the
        caller closes it once `in_use` says no request holds it). Call from any thread."""

        def swap() -> Engine | None:
            old = self._engines.get(engine.model_name)
            self._engines[engine.model_name] = engine
            self._loading.discard(engine.model_name)
            state = self.state(engine.model_name)
            state.version = engine.model_version
            state.swaps += 1 if old is not None else 0
            state.switched_at = time.time()
            return old

        return self.on_loop(swap)

    def state(self, name: str) -> ServingState:
        with self._lock:
            return self._states.setdefault(name, ServingState())

    @property
    def states(self) -> Mapping[str, ServingState]:
        return dict(self._states)

    @property
    def engines(self) -> Mapping[str, Engine]:
        return self._engines

    @property
    def loading(self) -> frozenset[str]:
        return frozenset(self._loading)

    # -- followers: who re-resolves an alias when a webhook says it moved -----------------------------

    def watch(self, registered: str, alias: str, served: str, poke: Callable[[], None]) -> None:
        """`poke()` re-resolves models:/registered@alias for the model served as `served`."""
        with self._lock:
            self._watchers.setdefault((registered, alias), []).append((served, poke))

    def poke(self, registered: str, alias: str | None = None) -> list[str]:
        """Wake the followers of `registered`@`alias` (every alias of it when None); the served names."""
        with self._lock:
            targets = [
                target
                for (name, followed), watchers in self._watchers.items()
                if name == registered and alias in (None, followed)
                for target in watchers
            ]
        for _, wake in targets:
            wake()
        return sorted({served for served, _ in targets})

    # -- leases: which engines requests still hold ---------------------------------------------------

    @contextlib.contextmanager
    def lease(self, engine: Engine) -> Iterator[None]:
        """Hold `engine` for a request (on the event loop): it is not closed by a swap until released."""
        key = id(engine)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._leases[key] - 1
            if left:
                self._leases[key] = left
            else:
                del self._leases[key]

    def in_use(self, engine: Engine) -> int:
        """How many requests hold `engine` now."""
        return self._leases.get(id(engine), 0)

    # -- drain: a name admits nothing for a while; its requests wait, they are not refused -----------

    def pause(self, name: str) -> None:
        """New requests for `name` wait (until `resume`) instead of picking its engine."""
        self.on_loop(lambda: self._paused.setdefault(name, asyncio.Event()))

    def resume(self, name: str) -> None:
        def release() -> None:
            gate = self._paused.pop(name, None)
            if gate is not None:
                gate.set()

        self.on_loop(release)

    async def _unpaused(self, pick: Callable[[], Engine], deadline: float, timeout_s: float) -> Engine:
        """`pick()` once its name is not paused; RequestTimeoutError past the loop-time `deadline`."""
        while True:
            engine = pick()
            gate = self._paused.get(engine.model_name)
            if gate is None:
                return engine  # no await from here to the caller's lease
            try:
                async with asyncio.timeout_at(deadline):
                    await gate.wait()
            except TimeoutError:
                raise RequestTimeoutError(timeout_s) from None

    async def acquire(self, name: object, task: str, deadline: float, timeout_s: float) -> Engine:
        """`for_task`, waiting while that model is paused for a drain swap."""
        return await self._unpaused(lambda: self.for_task(name, task), deadline, timeout_s)

    async def acquire_named(self, name: object, deadline: float, timeout_s: float) -> Engine:
        """`get(name)` (or `only()` for None), waiting while that model is paused for a drain swap."""
        return await self._unpaused(
            lambda: self.get(name) if name is not None else self.only(), deadline, timeout_s
        )

    # -- picking a model -----------------------------------------------------------------------------

    def _names(self) -> str:
        return ", ".join(sorted(self._engines)) or "none"

    def get(self, name: object) -> Engine:
        """The loaded model called `name` (any task)."""
        if not isinstance(name, str):
            raise InvalidRequestError("Invalid value for 'model': must be a string.", param="model")
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        if name in self._loading:
            raise ModelLoadingError(f"The model '{name}' is still loading; retry shortly.")
        raise NotFoundError(
            f"The model '{name}' does not exist on this server. Served models: {self._names()}.",
            param="model",
            code="model_not_found",
        )

    def for_task(self, name: object, task: str) -> Engine:
        """The model that answers a request for `task` naming `name` (None: the only model of that task)."""
        if name is not None:
            engine = self.get(name)
            if engine.inference_task != task:
                serves = f"{engine.inference_task} (at {engine.spec.route})"
                raise InvalidRequestError(
                    f"The model '{name}' serves {serves}, not {task}.",
                    param="model",
                    code="wrong_task",
                )
            return engine
        matches = [e for e in self._engines.values() if e.inference_task == task]
        if self._loading:
            raise ModelLoadingError("Models are still loading; name one in 'model' or retry shortly.")
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(e.model_name for e in matches)
            raise InvalidRequestError(
                f"Several models serve {task}; name one in 'model': {names}.",
                param="model",
            )
        raise NotFoundError(
            f"No model on this server serves {task}. Served models: {self._names()}.",
            param="model",
            code="model_not_found",
        )

    def only(self) -> Engine:
        """The single served model (for /invocations requests that name none)."""
        if self._loading:
            raise ModelLoadingError("Models are still loading; retry shortly.")
        if len(self._engines) != 1:
            raise InvalidRequestError(
                f"This server serves several models; name one in 'model': {self._names()}.", param="model"
            )
        return next(iter(self._engines.values()))
