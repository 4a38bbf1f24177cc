"""The OpenAI routes: one POST route per catalog task (answered whole or streamed), and /v1/models.

Handlers raise: every failure is an exception that the app's one error mapping turns into an OpenAI error
answer (or, once a stream has started, into its last event).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from llmadapter.catalog import CATALOG, TaskSpec
from llmadapter.engine.base import Engine
from llmadapter.protocol import ModelCard, ModelList
from llmadapter.server import sse
from llmadapter.server.body import read_object
from llmadapter.server.context import Context, ServerContext, served_by
from llmadapter.server.lifetime import until_done

JSON = "application/json"

router = APIRouter()


def _json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type=JSON)


async def _answer(request: Request, ctx: ServerContext, spec: TaskSpec) -> Response:
    raw = await read_object(request, ctx.settings.max_body_bytes)
    timeout_s = ctx.settings.request_timeout_s
    engine = await ctx.models.acquire(raw.get("model"), spec.inference_task, ctx.deadline(), timeout_s)
    served_by(request, engine)
    # No await from picking the engine to leasing it (ctx.admit): a swap cannot close it in between.
    parsed = engine.parse(raw, strict=True)  # JSON types as OpenAI checks them
    if getattr(parsed, "stream", None):
        return await sse.stream_answer(request, ctx, engine, parsed)
    async with ctx.admit(engine):
        result = await until_done(
            request, engine.arun(parsed), ctx.deadline(), ctx.settings.request_timeout_s
        )
    return _json_response(result)


def _task_endpoint(spec: TaskSpec) -> Callable[[Request, ServerContext], Awaitable[Response]]:
    # A closure, not a default argument: FastAPI would expose a defaulted parameter as a query field.
    async def endpoint(request: Request, ctx: Context) -> Response:
        return await _answer(request, ctx, spec)

    return endpoint


for _spec in CATALOG.values():
    router.add_api_route(_spec.route, _task_endpoint(_spec), methods=["POST"], include_in_schema=False)


def _card(ctx: ServerContext, engine: Engine) -> ModelCard:
    state = ctx.models.state(engine.model_name)
    return ModelCard(
        id=engine.model_name,
        task=engine.inference_task,
        version=engine.model_version or None,
        alias=state.alias,
        swap_failure=state.swap_failure,
        switched_at=int(state.switched_at) if state.switched_at else None,
        **(engine.weight_format or {}),
    )


@router.get("/v1/models", include_in_schema=False)
async def list_models(ctx: Context) -> Response:
    cards = [_card(ctx, engine) for _, engine in sorted(ctx.models.engines.items())]
    return _json_response(ModelList(data=cards))


@router.get("/v1/models/{model_id:path}", include_in_schema=False)
async def get_model(model_id: str, request: Request, ctx: Context) -> Response:
    engine = ctx.models.get(model_id)
    request.state.model_version = engine.model_version  # the header; the metrics label stays "other"
    return _json_response(_card(ctx, engine))
