"""The one place an exception becomes an OpenAI error answer (status, JSON body, headers); never a trace.

Server-only conditions are LLMAdapterError subclasses too, so the tree stays one tree:

    LLMAdapterError
    ├── PayloadTooLargeError     413  invalid_request_error  code=payload_too_large
    ├── RequestTimeoutError      504  server_error           code=timeout
    ├── ModelLoadingError        503  server_error           code=model_loading (carries retry_after)
    └── (llmadapter.errors: InvalidRequestError 400, AuthenticationError 401, NotFoundError 404,
         OverloadedError 429, ...)
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.exceptions import HTTPException

from llmadapter.errors import (
    GenerationError,
    InvalidRequestError,
    LLMAdapterError,
    OverloadedError,
    first_error,
)
from llmadapter.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("llmadapter.server")


class PayloadTooLargeError(LLMAdapterError):
    status_code = 413
    error_type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than the limit of {limit} bytes.", code="payload_too_large"
        )


class RequestTimeoutError(LLMAdapterError):
    status_code = 504
    error_type = "server_error"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"The request did not finish within {timeout_s:g} s and was cancelled.", code="timeout"
        )


class ModelLoadingError(LLMAdapterError):
    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, param="model", code="model_loading")
        self.retry_after = retry_after


# Starlette's own HTTP errors (unknown route, wrong method) keep their status, in OpenAI form.
_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class ErrorAnswer:
    """What the client receives for a failure."""

    status_code: int
    body: ErrorResponse
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> str:
        # The full error object (param and code as null when unset), as OpenAI sends it.
        return self.body.model_dump_json()


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def to_error_answer(exc: BaseException) -> ErrorAnswer:
    """Map any exception to (status, OpenAI error body, headers); unknown ones become an opaque 500.

    The message of an unexpected exception is not shown: it may hold paths, tensors or a stack; the
    full traceback goes to the server log instead, under an id the client sees.
    """
    if isinstance(exc, GenerationError):
        # Its message may hold internals (tensor shapes, device errors): the log gets it, the client a ref.
        ref = uuid.uuid4().hex[:12]
        log.error("generation failed (ref %s): %s", ref, exc.message)
        body = ErrorBody(
            message=f"Generation failed (ref {ref}); see the server log.",
            type=exc.error_type,
            code=exc.code,
        )
        return ErrorAnswer(exc.status_code, ErrorResponse(error=body))
    if isinstance(exc, LLMAdapterError):
        headers: dict[str, str] = {}
        if isinstance(exc, OverloadedError | ModelLoadingError):
            headers = _retry_after(exc.retry_after)
        elif exc.status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}  # RFC 6750
        body = ErrorBody(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
        return ErrorAnswer(exc.status_code, ErrorResponse(error=body), headers)
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError | RecursionError):
        return to_error_answer(invalid_json(exc))
    if isinstance(exc, ValidationError):
        first = first_error(exc)
        return to_error_answer(
            InvalidRequestError(
                f"Invalid value for '{first.where}': {first.message}.", param=first.where or None
            )
        )
    if isinstance(exc, HTTPException):
        error_type = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        if exc.status_code >= 500:
            error_type = "server_error"
        body = ErrorBody(message=str(exc.detail), type=error_type)
        return ErrorAnswer(exc.status_code, ErrorResponse(error=body), dict(exc.headers or {}))
    ref = uuid.uuid4().hex[:12]
    log.error("unexpected error (ref %s)", ref, exc_info=exc)
    body = ErrorBody(
        message=f"Internal server error (ref {ref}).", type="server_error", code="internal_error"
    )
    return ErrorAnswer(500, ErrorResponse(error=body))


def invalid_json(exc: BaseException) -> InvalidRequestError:
    """The 400 for a body that is not UTF-8 JSON, saying where it broke."""
    if isinstance(exc, json.JSONDecodeError):
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}."
    elif isinstance(exc, UnicodeDecodeError):
        detail = f"Invalid UTF-8 byte at position {exc.start}."
    elif isinstance(exc, UnicodeEncodeError):
        detail = "A string holds a lone UTF-16 surrogate escape."
    elif isinstance(exc, RecursionError):
        detail = "It is nested too deeply."
    else:
        detail = str(exc).split("\n")[0][:200] + "."
    return InvalidRequestError(
        f"The request body is not valid JSON (UTF-8 encoded): {detail}", code="invalid_json"
    )
