"""vLLM's small routes: POST /tokenize and POST /detokenize (a served model's tokenizer, vLLM's request and
response shapes) behind the API key, and GET /version, open like /health."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from llmadapter.engine.base import Engine
from llmadapter.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    VersionResponse,
    parse_request,
)
from llmadapter.server.body import read_object
from llmadapter.server.context import Context, ServerContext, served_by

JSON = "application/json"

tokenizer_router = APIRouter()
version_router = APIRouter()


def routers(guarded: list[Any]) -> list[tuple[APIRouter, list[Any]]]:
    """(router, dependencies) for build_app: the tokenizer routes guarded like /v1, /version open."""
    return [(tokenizer_router, guarded), (version_router, [])]


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type=JSON)


async def _engine_for(request: Request, ctx: ServerContext) -> tuple[Engine, dict[str, Any]]:
    """The body and the model it names (any task; the only served model when it names none)."""
    raw = await read_object(request, ctx.settings.max_body_bytes)
    name = raw.get("model")
    engine = ctx.models.get(name) if name is not None else ctx.models.only()
    served_by(request, engine)  # sync from here on: a swap cannot close the engine while it answers
    return engine, raw


@tokenizer_router.post("/tokenize", include_in_schema=False)
async def tokenize(request: Request, ctx: Context) -> Response:
    engine, raw = await _engine_for(request, ctx)
    # vLLM's two shapes: chat messages through the chat template, or a prompt as completions take it.
    shape = TokenizeChatRequest if "messages" in raw else TokenizeCompletionRequest
    return _json(engine.tokenize(parse_request(shape, raw, strict=True)))


@tokenizer_router.post("/detokenize", include_in_schema=False)
async def detokenize(request: Request, ctx: Context) -> Response:
    engine, raw = await _engine_for(request, ctx)
    return _json(engine.detokenize(parse_request(DetokenizeRequest, raw, strict=True)))


@version_router.get("/version", include_in_schema=False)
async def version() -> Response:
    try:
        number = metadata.version("llmadapter")
    except metadata.PackageNotFoundError:  # run from a source checkout
        number = "0+unknown"
    return _json(VersionResponse(version=number))
