"""POST /invocations: the bodies `mlflow models serve` accepts, answered as our pyfunc's `predict` answers.

The envelope (`dataframe_split`, `dataframe_records`, `instances`, `inputs`, a plain OpenAI body, or
`text/csv`) is read here; its rows become requests through `llmadapter.rows`, exactly as in `predict`.
One request asking for a stream (its `stream`, or `params.stream`) gets the SSE stream the /v1 route
gives, which `mlflow models serve` cannot (MLflow issue 12439); our pyfunc's `predict` still answers whole.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmadapter.engine.base import Engine
from llmadapter.errors import InvalidRequestError
from llmadapter.rows import plain_rows, request_rows
from llmadapter.server import sse
from llmadapter.server.body import parse_object, read_body
from llmadapter.server.context import Context, ServerContext, served_by
from llmadapter.server.lifetime import all_or_none, until_done

INVOCATIONS = "/invocations"
# The keys `mlflow models serve` accepts on /invocations (mlflow.pyfunc.scoring_server).
_MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
# A body holding one of these is an unwrapped OpenAI request (mlflow's "unified LLM input").
_LLM_KEYS = ("messages", "prompt", "input")
# Text columns of a CSV body stay text ("42" is a prompt, not a number), as the signature's types make
# MLflow read them; the numeric parameters are inferred.
_CSV_TEXT = ("prompt", "input", "model", "stop", "user", "suffix", "encoding_format")

router = APIRouter()


@dataclass(frozen=True)
class Invocation:
    """The rows of one /invocations body, the `params` that fill what a row leaves out, and whether the
    answer is wrapped in {"predictions": ...}."""

    rows: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    wrapped: bool = True

    @property
    def streams(self) -> bool:
        """Whether the body asks for a stream: a row's `stream`, or `params.stream`."""
        return any(source.get("stream") is True for source in (self.params, *self.rows))


@router.post(INVOCATIONS, include_in_schema=False)
async def invocations(request: Request, ctx: Context) -> Response:
    body = await read_body(request, ctx.settings.max_body_bytes)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "text/csv":
        invocation = read_csv(body)
    else:
        invocation = split_invocation(parse_object(body))
    engine = await _engine_for(ctx, invocation.rows)
    served_by(request, engine)
    # No await from picking the engine to leasing it (ctx.admit): a swap cannot close it in between.
    if invocation.streams:
        rows = request_rows(invocation.rows, invocation.params, engine.spec, streaming=True)
        if len(rows) != 1:
            raise InvalidRequestError(
                f"A streamed invocation holds exactly one request; this one holds {len(rows)}.",
                param="stream",
            )
        return await sse.stream_answer(request, ctx, engine, engine.parse(rows[0]))
    parsed = [engine.parse(row) for row in request_rows(invocation.rows, invocation.params, engine.spec)]
    async with ctx.admit(engine):
        results = await until_done(
            request,
            all_or_none([engine.arun(item) for item in parsed]),
            ctx.deadline(),
            ctx.settings.request_timeout_s,
        )
    predictions = [result.model_dump(mode="json", exclude_none=True) for result in results]
    # One request answers one object, several a list: what our pyfunc's predict returns.
    payload: Any = predictions[0] if len(predictions) == 1 else predictions
    if invocation.wrapped:
        payload = {"predictions": payload}
    return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")


async def _engine_for(ctx: ServerContext, rows: list[dict[str, Any]]) -> Engine:
    """The model every row names (the only one served when none does)."""
    requested = [row.get("model") for row in rows]
    if any(m is not None and not isinstance(m, str) for m in requested):
        raise InvalidRequestError("Invalid value for 'model': must be a string.", param="model")
    names = set(requested) - {None}
    if len(names) > 1:
        raise InvalidRequestError("All rows of one invocation must name the same 'model'.", param="model")
    timeout_s = ctx.settings.request_timeout_s
    return await ctx.models.acquire_named(names.pop() if names else None, ctx.deadline(), timeout_s)


def split_invocation(raw: dict[str, Any]) -> Invocation:
    """The rows of a JSON /invocations body.

    Accepts what `mlflow models serve` accepts for JSON: `dataframe_split`, `dataframe_records`,
    `instances`, `inputs` (answered as {"predictions": [...]}, one per row; an optional `params` object
    fills fields a row leaves out), or a plain OpenAI request body (answered unwrapped, as mlflow does for
    its "unified LLM input"). A null cell means "not given", as pandas writes missing values.
    """
    formats = [key for key in _MLFLOW_FORMATS if key in raw]
    if not formats:
        if any(key in raw for key in _LLM_KEYS):
            return Invocation(plain_rows(raw), wrapped=False)
        raise InvalidRequestError(
            "The body must hold exactly one of "
            f"{', '.join(_MLFLOW_FORMATS)}, or be an OpenAI request (with {', '.join(_LLM_KEYS)})."
        )
    extra = set(raw) - {formats[0], "params"}
    if len(formats) > 1 or extra:
        raise InvalidRequestError(
            f"The body must hold exactly one of {', '.join(_MLFLOW_FORMATS)} (and optionally 'params'); "
            f"got {', '.join(sorted(raw))}.",
            param=formats[-1] if len(formats) > 1 else sorted(extra)[0],
        )
    key = formats[0]
    rows = _rows(key, raw[key])
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("Invalid value for 'params': must be an object.", param="params")
    if not rows:
        raise InvalidRequestError(f"Invalid value for '{key}': no rows.", param=key)
    return Invocation(plain_rows(rows), params)


def read_csv(body: bytes) -> Invocation:
    """The rows of a `text/csv` /invocations body, read as `mlflow models serve` reads it (pandas); an
    empty cell means "not given"."""
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(body.decode("utf-8")), dtype=dict.fromkeys(_CSV_TEXT, str))
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequestError(f"The body is not valid CSV: {detail}", code="invalid_csv") from None
    if frame.empty:
        raise InvalidRequestError("The CSV body has a header but no rows.", code="invalid_csv")
    return Invocation(plain_rows(frame))


def _rows(key: str, value: Any) -> list[dict[str, Any]]:
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
            raise InvalidRequestError(
                'Invalid value for \'dataframe_split\': expected {"columns": [...], "data": [[...], ...]}.',
                param=key,
            )
        columns, data = value["columns"], value.get("data")
        if not isinstance(data, list) or not all(
            isinstance(r, list) and len(r) == len(columns) for r in data
        ):
            raise InvalidRequestError(
                "Invalid value for 'dataframe_split.data': every row must be a list as long as 'columns'.",
                param=f"{key}.data",
            )
        if not all(isinstance(c, str) for c in columns):
            raise InvalidRequestError(
                "Invalid value for 'dataframe_split.columns': names must be strings.", param=f"{key}.columns"
            )
        return [dict(zip(columns, r, strict=True)) for r in data]
    if isinstance(value, dict):
        if key == "inputs" and _is_columnar(value):
            size = len(next(iter(value.values())))
            return [{col: cells[i] for col, cells in value.items()} for i in range(size)]
        return [value]
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        return list(value)
    raise InvalidRequestError(f"Invalid value for '{key}': expected a list of objects.", param=key)


def _is_columnar(value: dict[str, Any]) -> bool:
    """{"messages": [[...], [...]], "max_tokens": [5, 7]}: every column a list of the same length, and
    chat messages given per row (a list of message lists)."""
    if not value or not all(isinstance(v, list) for v in value.values()):
        return False
    if len({len(v) for v in value.values()}) != 1:
        return False
    messages = value.get("messages")
    return messages is None or all(isinstance(m, list) for m in messages)
