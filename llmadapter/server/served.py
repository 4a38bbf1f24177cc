"""The models one app answers for, by their engines' `model_name`, and how a request picks one.

A request's `model` must be the name of a served model (404 `model_not_found` otherwise; 400 naming
`model` when that model serves another task). When `model` is omitted and exactly one loaded model
serves the route's task, that model answers; OpenAI clients always send it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from llmadapter.engine.base import Engine
from llmadapter.errors import InvalidRequestError, NotFoundError
from llmadapter.server.errors import ModelLoadingError


class ServedModels:
    """Loaded engines by their `model_name`, and names whose engines are still loading."""

    def __init__(self, engines: Iterable[Engine] = (), loading: Collection[str] = ()) -> None:
        self._engines: dict[str, Engine] = {engine.model_name: engine for engine in engines}
        self._loading: set[str] = set(loading) - set(self._engines)

    def add(self, engine: Engine) -> None:
        """Serve a freshly loaded engine (called from a loader thread: plain dict/set updates only)."""
        self._engines[engine.model_name] = engine
        self._loading.discard(engine.model_name)

    @property
    def engines(self) -> Mapping[str, Engine]:
        return self._engines

    @property
    def loading(self) -> frozenset[str]:
        return frozenset(self._loading)

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
