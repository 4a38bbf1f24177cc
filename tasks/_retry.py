"""Which failures are worth a retry: network and store hiccups only, never a user or model error."""

from __future__ import annotations

import sqlite3
from typing import Any

from llmadapter.errors import LLMAdapterError

# ModelSourceError codes that mean "the hub did not answer", as opposed to "no such repo/revision".
_TRANSIENT_SOURCE_CODES = frozenset({"hub_unreachable"})
# MLflow error codes for a tracking server that is busy or briefly away.
_TRANSIENT_MLFLOW_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"}
)


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix: connection errors, timeouts, 5xx/429, a locked SQLite file."""
    if isinstance(exc, LLMAdapterError):
        return exc.code in _TRANSIENT_SOURCE_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    try:
        from mlflow.exceptions import MlflowException, RestException

        if isinstance(exc, RestException | MlflowException) and exc.error_code in _TRANSIENT_MLFLOW_CODES:
            return True
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    try:
        import requests

        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return exc.response.status_code == 429 or exc.response.status_code >= 500
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import sqlalchemy.exc

        if isinstance(exc, sqlalchemy.exc.OperationalError):
            return "locked" in str(exc) or "busy" in str(exc)
    except ImportError:  # pragma: no cover
        pass
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_transient(cause)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False
