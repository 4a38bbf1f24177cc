"""What the route modules share, built once per app by `build_app` and handed to each handler by Depends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from llmadapter.engine.base import Engine
from llmadapter.server.errors import ErrorAnswer
from llmadapter.server.metrics import ServerMetrics
from llmadapter.server.served import ServedModels
from llmadapter.server.settings import ServerSettings


@dataclass(frozen=True)
class ServerContext:
    models: ServedModels
    settings: ServerSettings
    metrics: ServerMetrics
    # One of the server-wide request slots and a lease on the engine, held while a request generates
    # (429 past the bound). Enter it right after picking the engine, with no await between.
    admit: Callable[[Engine], AbstractAsyncContextManager[None]]
    # The OpenAI error answer for a failure at a path, counted in the metrics: the one mapping.
    answer_error: Callable[[str, BaseException], ErrorAnswer]

    def deadline(self) -> float:
        """The loop time by which a request starting now must be answered."""
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s


def served_by(request: Request, engine: Engine) -> None:
    """Record which model and version answer `request`: the metrics label and the version header."""
    request.state.model = engine.model_name
    request.state.model_version = engine.model_version


def _context(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.context
    return context


Context = Annotated[ServerContext, Depends(_context)]
