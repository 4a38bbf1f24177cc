"""The pyfunc model `mlflow.pyfunc.load_model` returns: OpenAI request dicts in, OpenAI dicts out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from llmadapter.errors import InvalidRequestError
from llmadapter.rows import plain_rows, request_rows

if TYPE_CHECKING:
    from pydantic import BaseModel

    from llmadapter.engine.base import Engine


class LLMAdapterPyfunc:
    """What MLflow hands predict calls to; `get_raw_model()` is the engine that answers them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get_raw_model(self) -> Engine:
        return self.engine

    def _requests(
        self, data: Any, params: Mapping[str, Any] | None, *, streaming: bool = False
    ) -> list[BaseModel]:
        rows = request_rows(plain_rows(data), params, self.engine.spec, streaming=streaming)
        return [self.engine.parse(row) for row in rows]

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> Any:
        requests = self._requests(data, params)
        responses = [r.model_dump(exclude_none=True) for r in self.engine.run(requests)]
        return responses[0] if len(responses) == 1 else responses

    def predict_stream(self, data: Any, params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        requests = self._requests(data, params, streaming=True)
        if len(requests) != 1:
            raise InvalidRequestError("predict_stream takes exactly one request.", param=None)
        request = requests[0]
        include_usage = True
        options = getattr(request, "stream_options", None)
        if options is not None:
            include_usage = bool(options.include_usage)
            request = request.model_copy(update={"stream_options": None})
        for chunk in self.engine.stream(request, include_usage=include_usage):
            yield chunk.model_dump(exclude_none=True)
