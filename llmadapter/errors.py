"""The one exception tree of llmadapter; each error carries its HTTP status and OpenAI error fields.

llmadapter.server.errors.to_error_answer is the one place that turns an error into OpenAI's error JSON.

LLMAdapterError                    500  server_error
├── InvalidRequestError            400  invalid_request_error   (bad parameter value; names `param`)
│   └── ContextLengthError         400  invalid_request_error   code=context_length_exceeded
├── AuthenticationError            401  authentication_error
├── NotFoundError                  404  not_found_error         (unknown model or route for a task)
├── OverloadedError                429  rate_limit_error        (queue full; carries retry_after)
├── GenerationError                500  server_error            (the model failed; HTTP shows a log ref)
├── ConfigError                    400  invalid_request_error   (bad model_config / log arguments)
├── ModelSourceError               400  invalid_request_error   (a source that cannot be resolved)
├── ValidationFailedError          422  validation_error        (a logged model failed validation)
├── ArtifactStoreError             503  server_error            (the artifact store is down or refuses us;
│                                                                names the store; code says which)
├── EvaluationError                400  invalid_request_error   (a bad evaluation set, scorer or judge)
└── QualityGateError               422  validation_error        (a version below the quality gate)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pydantic import ValidationError


class LLMAdapterError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(LLMAdapterError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationError(LLMAdapterError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(LLMAdapterError):
    status_code = 404
    error_type = "not_found_error"


class OverloadedError(LLMAdapterError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after


class GenerationError(LLMAdapterError):
    """The model failed on a batch, not the request: the message names the cause for library callers
    (pyfunc predict, validation reports); HTTP answers carry only a reference to the server log."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Generation failed: {type(cause).__name__}: {cause}", code="generation_failed")
        self.__cause__ = cause


class ConfigError(LLMAdapterError):
    status_code = 400
    error_type = "invalid_request_error"


class ServingNotConfirmedError(LLMAdapterError):
    """A promoted version that running servers did not switch to within the wait."""

    status_code = 503
    error_type = "server_error"


class ModelSourceError(LLMAdapterError):
    status_code = 400
    error_type = "invalid_request_error"


class ValidationFailedError(LLMAdapterError):
    status_code = 422
    error_type = "validation_error"


class ArtifactStoreError(LLMAdapterError):
    """An artifact store (S3, a tracking server's artifact proxy) failed: llmadapter.artifact_store."""

    status_code = 503


class EvaluationError(LLMAdapterError):
    status_code = 400
    error_type = "invalid_request_error"


class QualityGateError(LLMAdapterError):
    status_code = 422
    error_type = "validation_error"


@dataclass(frozen=True)
class FirstError:
    """The first problem of a pydantic ValidationError, in the words our messages use."""

    where: str  # dotted location ("messages.0.role"), "" for the whole object
    message: str  # pydantic's message without its "Value error, " prefix
    kind: str  # pydantic's error type ("extra_forbidden", "missing", "int_type", ...)
    loc: tuple[str | int, ...] = ()  # the location as pydantic gives it, for callers that spell it otherwise


def first_error(exc: ValidationError) -> FirstError:
    """The one conversion from a pydantic ValidationError to (location, message, type)."""
    errors = exc.errors()
    if not errors:
        return FirstError("", "invalid value", "value_error")
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return FirstError(where, message, str(first.get("type", "value_error")), tuple(first.get("loc", ())))
