"""Retries only on transient failures: the condition, and Prefect actually applying it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from prefect import flow

from llmadapter.errors import ConfigError, ModelSourceError, ValidationFailedError
from tasks import download, log, register, validate
from tasks._retry import is_transient, retry_on_transient, transient_task


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError(), True),
        (requests.ConnectionError("refused"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (ModelSourceError("hub down", param="source", code="hub_unreachable"), True),
        (ModelSourceError("no such repo", param="source", code="repo_not_found"), False),
        (ConfigError("bad key", param="temperature"), False),
        (ValidationFailedError("failed"), False),
        (MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST), False),
        (ValueError("bug"), False),
    ],
    ids=[
        "connection",
        "timeout",
        "requests-connection",
        "sqlite-locked",
        "mlflow-unavailable",
        "hub-unreachable",
        "repo-not-found",
        "config-error",
        "validation-failed",
        "mlflow-not-found",
        "plain-bug",
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_a_wrapped_transient_cause_is_transient() -> None:
    try:
        try:
            raise ConnectionError("reset")
        except ConnectionError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_mlflow_rest_client_connection_failure_is_transient() -> None:
    # MLflow's REST client raises MlflowException(INTERNAL_ERROR) inside `except`, without `from`:
    # the connection error is only in __context__.
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    with pytest.raises(MlflowException) as caught:
        http_request(
            MlflowHostCreds("http://127.0.0.1:9"), "/api/2.0/mlflow/experiments/get", "GET", max_retries=0
        )

    assert caught.value.__cause__ is None
    assert is_transient(caught.value)


def test_a_tracking_server_answering_503_after_mlflows_retries_is_transient() -> None:
    # What a client sees while the tracking server's PostgreSQL restarts: 503s until MLflow gives up.
    import http.server
    import threading

    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(MlflowException) as caught:
            http_request(
                MlflowHostCreds(f"http://127.0.0.1:{server.server_port}"),
                "/api/2.0/mlflow/experiments/get",
                "GET",
                max_retries=1,
                backoff_factor=0,
            )
    finally:
        server.shutdown()
        server.server_close()
    assert "too many 503 error responses" in caught.value.message
    assert is_transient(caught.value)


def _mlflow_sql_error(db: Path, statement: str, *, locked: bool = False) -> MlflowException:
    """The MlflowException that MLflow's SQL store raises for `statement` on a real SQLite file."""
    import sqlalchemy
    from mlflow.store.db.utils import _get_managed_session_maker
    from sqlalchemy.orm import sessionmaker

    holder = sqlite3.connect(db, timeout=0)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.commit()
    if locked:
        holder.execute("BEGIN EXCLUSIVE")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})
    managed = _get_managed_session_maker(sessionmaker(bind=engine), "sqlite")
    try:
        with managed() as session:
            session.execute(sqlalchemy.text(statement))
    except MlflowException as exc:
        return exc
    finally:
        holder.close()
        engine.dispose()
    raise AssertionError(f"{statement} did not fail")


@pytest.mark.parametrize(
    ("statement", "locked", "transient"),
    [("SELECT * FROM experiments", False, False), ("SELECT * FROM t", True, True)],
    ids=["no-such-table", "locked"],
)
def test_mlflow_sql_store_errors_are_retried_only_when_the_database_is_busy(
    tmp_path: Path, statement: str, locked: bool, transient: bool
) -> None:
    exc = _mlflow_sql_error(tmp_path / "mlflow.db", statement, locked=locked)

    # MLflow labels both TEMPORARILY_UNAVAILABLE; only the database error underneath tells them apart.
    assert exc.error_code == "TEMPORARILY_UNAVAILABLE"
    assert is_transient(exc) is transient


def test_an_error_raised_from_none_hides_its_context() -> None:
    try:
        try:
            raise ConnectionError("reset")
        except ConnectionError:
            raise RuntimeError("bad input") from None
    except RuntimeError as outer:
        assert not is_transient(outer)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("error", "calls"), [(ConnectionError, 3), (ConfigError, 1)], ids=["transient", "user"]
)
def test_prefect_retries_transient_failures_only(error: type[Exception], calls: int) -> None:
    attempts: list[int] = []

    @transient_task(retry_delay_seconds=0)
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise error("boom")
        return "ok"

    @flow
    def run() -> str:
        return flaky()

    state = run(return_state=True)
    assert len(attempts) == calls
    assert state.is_completed() is (calls == 3)


@pytest.mark.parametrize(
    ("prefect_task", "retries", "delays"),
    [
        (download.download_model, 3, [2, 10, 30]),
        (download.check_latest_revision, 3, [2, 10, 30]),
        (log.log_model, 2, [5, 30]),
        (log.run_exists, 2, [2, 10]),
        (register.find_registered_version, 2, [2, 10]),
        (register.register_model, 2, [2, 10]),
        (register.promote_version, 2, [2, 10]),
        (validate.publish_report, 2, 5),
    ],
    ids=["download", "latest-revision", "log", "run-exists", "find", "register", "promote", "publish-report"],
)
def test_network_facing_tasks_retry_on_transient_errors(
    prefect_task: Any, retries: int, delays: int | list[int]
) -> None:
    """The policy in tasks/_retry.py, with each task's own overrides."""
    assert prefect_task.retries == retries
    assert prefect_task.retry_delay_seconds == delays
    assert prefect_task.retry_condition_fn is retry_on_transient
