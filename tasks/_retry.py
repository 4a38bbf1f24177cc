"""The tasks' retry policy: retry network and store hiccups only, never a user or model error."""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

from prefect import task

from llmadapter.artifact_store import UNAVAILABLE as ARTIFACT_STORE_UNAVAILABLE
from llmadapter.errors import LLMAdapterError

# llmadapter error codes for a service that may come back: the hub did not answer (as opposed to "no
# such repo/revision"), the artifact store is down (as opposed to refusing our credentials).
_TRANSIENT_CODES = frozenset({"hub_unreachable", ARTIFACT_STORE_UNAVAILABLE})
# MLflow error codes for a tracking server that is busy or briefly away.
_TRANSIENT_MLFLOW_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"}
)
# Database errors that a retry cannot fix: the schema or the file is wrong, not busy.
_PERMANENT_SQL_MARKERS = (
    "no such table",
    "no such column",
    "does not exist",
    "syntax error",
    "readonly database",
    "unable to open database file",
)


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix: connection errors, timeouts, 5xx/429, a locked SQLite file.

    Unknown wrappers are looked through, along __cause__ and, where Python would show it, __context__:
    MLflow's REST client raises MlflowException(INTERNAL_ERROR) inside an `except` without `from`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _verdict(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _verdict(exc: BaseException) -> bool | None:
    """Transient or not for the exception types we know; None to decide by what it wraps."""
    if isinstance(exc, LLMAdapterError):
        return exc.code in _TRANSIENT_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if _is_database_error(exc):
        return "locked" in str(exc) or "busy" in str(exc)
    try:
        from mlflow.exceptions import MlflowException, RestException

        if isinstance(exc, RestException | MlflowException) and exc.error_code in _TRANSIENT_MLFLOW_CODES:
            # MLflow's SQL store reports every SQLAlchemy OperationalError as TEMPORARILY_UNAVAILABLE,
            # "no such table" (a store never migrated, a wrong URI) included.
            return not _wraps_permanent_database_error(exc)
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    try:
        import requests

        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(exc, requests.exceptions.RetryError):
            # MLflow's client retries only 429 and 5xx, so the server kept answering those: a tracking
            # server whose PostgreSQL restarts answers 503 until it is back.
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
    return None


def _is_database_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return True
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, sqlalchemy.exc.OperationalError)


def _wraps_permanent_database_error(exc: BaseException) -> bool:
    inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if inner is None or not _is_database_error(inner):
        return False
    message = str(inner).lower()
    return any(marker in message for marker in _PERMANENT_SQL_MARKERS)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# Store and hub calls are cheap to repeat and idempotent: two quick retries, on transient failures only.
# A task overrides any of these, or adds its own options: `@transient_task(name=..., retries=3)`.
transient_task = functools.partial(
    task, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_transient
)
