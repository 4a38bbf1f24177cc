"""Artifact store failures as the libraries raise them, named by llmadapter.artifact_store (glue; the real
stores are in tests/platform)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from mlflow.exceptions import MlflowException

from llmadapter.artifact_store import REFUSED, UNAVAILABLE, describe_store_error, store_errors_named
from llmadapter.errors import ArtifactStoreError
from tasks._retry import is_transient

ENDPOINT = "http://127.0.0.1:28333"
PROXY = "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/models/m-1/artifacts/MLmodel"


def _client_error(code: str, message: str = "nope") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "PutObject")


def _wrapped(inner: BaseException) -> BaseException:
    """`inner` as MLflow lets it out: raised inside an except block, without `from`."""
    try:
        try:
            raise inner
        except Exception:
            raise RuntimeError("while logging") from None
    except RuntimeError as outer:
        outer.__cause__ = None
        outer.__context__ = inner
        return outer


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (_client_error("SignatureDoesNotMatch"), REFUSED, f"the S3 store at {ENDPOINT} refused"),
        (_client_error("InvalidAccessKeyId"), REFUSED, "InvalidAccessKeyId: nope"),
        (_client_error("NoSuchBucket"), REFUSED, "has no bucket"),
        (_client_error("InternalError"), UNAVAILABLE, f"the S3 store at {ENDPOINT} failed"),
        (NoCredentialsError(), REFUSED, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        (EndpointConnectionError(endpoint_url=ENDPOINT), UNAVAILABLE, "is unreachable"),
        (
            MlflowException(f"API request to {PROXY} failed with exception ... too many 500 error responses"),
            UNAVAILABLE,
            "the tracking server http://127.0.0.1:5000 could not move 1/models/m-1/artifacts/MLmodel",
        ),
        (
            MlflowException(f"API request to {PROXY} failed with exception ('Connection aborted.', ...)"),
            UNAVAILABLE,
            "--artifacts-destination",
        ),
        (
            MlflowException(
                "API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts failed with "
                "exception ...: Max retries exceeded with url: "
                "/api/2.0/mlflow-artifacts/artifacts?path=1%2Fmodels%2Fm-1 "
                "(Caused by ResponseError('too many 500 error responses'))"
            ),
            UNAVAILABLE,
            "the tracking server http://127.0.0.1:5000 could not move 1/models/m-1 to or from",
        ),
        (_wrapped(_client_error("AccessDenied")), REFUSED, "refused this process's credentials"),
    ],
    ids=[
        "bad-secret",
        "unknown-key",
        "no-bucket",
        "s3-5xx",
        "no-credentials",
        "s3-down",
        "proxy-500",
        "proxy-dropped",
        "proxy-listing-500",
        "wrapped-in-context",
    ],
)
def test_store_failures_are_named_with_whether_a_retry_helps(
    exc: BaseException, code: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", ENDPOINT)
    with pytest.raises(ArtifactStoreError) as raised, store_errors_named("Logging the model failed"):
        raise exc
    assert raised.value.code == code
    assert raised.value.message.startswith("Logging the model failed: ")
    assert words in raised.value.message
    assert raised.value.__cause__ is exc
    assert is_transient(raised.value) is (code == UNAVAILABLE)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a model error"),
        MlflowException(f"API request to {PROXY} failed with exception ... Connection refused"),
        MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get: error code 500"),
    ],
    ids=["not-a-store", "tracking-server-down", "tracking-api-500"],
)
def test_other_failures_pass_through_unchanged(exc: BaseException) -> None:
    assert describe_store_error(exc) is None
    with pytest.raises(type(exc)) as raised, store_errors_named("Logging the model failed"):
        raise exc
    assert raised.value is exc


def test_without_an_endpoint_the_store_is_aws() -> None:
    found = describe_store_error(_client_error("SignatureDoesNotMatch"))
    assert found is not None and "S3 (AWS; MLFLOW_S3_ENDPOINT_URL is not set)" in found[1]
