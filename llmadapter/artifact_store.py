"""Artifact store failures named: which store (an S3 endpoint, a tracking server's artifact proxy) and why.

MLflow lets the object store's own exception through (boto3's, several layers deep) or, behind a
tracking server that proxies artifacts, a bare "too many 500 error responses" for one file. Logging,
loading and persisting weights run inside `store_errors_named`, which turns those into one
ArtifactStoreError saying which store failed, whether a retry may help (`code`), and what to check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote

from llmadapter.errors import ArtifactStoreError

__all__ = ["REFUSED", "UNAVAILABLE", "describe_store_error", "store_errors_named"]

# ArtifactStoreError codes: a store that may come back (retry) vs one that refuses us (fix, then rerun).
UNAVAILABLE = "artifact_store_unavailable"
REFUSED = "artifact_store_refused"

# S3 error codes that mean "these credentials may not do this here".
_REFUSED_S3_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
)
# How MLflow's REST client words a tracking server's 5xx (after its retries, or on one response), or a
# server that answered an upload's first bytes with an error and dropped the connection. A refused
# connection is the tracking server itself gone, not its store: that error is left as it is.
_SERVER_ERROR = re.compile(
    r"too many 5\d\d error responses|error code 5\d\d|Connection aborted|Connection reset|RemoteDisconnected"
)
# A proxied artifact URL in MLflow's message: the server, then the file (PUT/GET .../artifacts/<path>)
# or the folder listed (GET .../artifacts?path=<quoted path>, which may appear without the host).
_PROXY_URL = re.compile(
    r"(https?://[^\s/]+(?:/\S*?)?)/api/2\.0/mlflow-artifacts/artifacts(?:/(?P<path>[^\s?]+))?"
)
_LISTED_PATH = re.compile(r"/api/2\.0/mlflow-artifacts/artifacts\?path=([^\s&)]+)")


def _s3_endpoint() -> str:
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return f"the S3 store at {endpoint}" if endpoint else "S3 (AWS; MLFLOW_S3_ENDPOINT_URL is not set)"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps, causes before contexts: a failure while MLflow cleans up after the
    store's error (marking the model FAILED) hides that error in a context below its own cause."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__context__, current.__cause__) if e is not None)


def _describe_one(exc: BaseException) -> tuple[str, str] | None:
    """(code, what went wrong) for one exception of the chain, None when it is not the store's."""
    try:
        import botocore.exceptions as boto
    except ImportError:  # boto3 is in the platform extra; without it no S3 store is in use
        boto = None
    if boto is not None:
        if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
            return REFUSED, (
                f"{_s3_endpoint()} needs credentials and this process has none ({exc}): set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile), or use a tracking server "
                "that proxies artifacts (--artifacts-destination), which needs none"
            )
        if isinstance(exc, boto.EndpointConnectionError | boto.ConnectTimeoutError | boto.ReadTimeoutError):
            return UNAVAILABLE, f"{_s3_endpoint()} is unreachable ({exc})"
        if isinstance(exc, boto.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            text = f"{code}: {error.get('Message', exc)}"
            if code in _REFUSED_S3_CODES:
                return REFUSED, (
                    f"{_s3_endpoint()} refused this process's credentials ({text}; access key "
                    f"{os.environ.get('AWS_ACCESS_KEY_ID', 'from the default chain')})"
                )
            if code == "NoSuchBucket":
                return REFUSED, f"{_s3_endpoint()} has no bucket {error.get('BucketName', '')} ({text})"
            return UNAVAILABLE, f"{_s3_endpoint()} failed ({text})"
    if type(exc).__name__ == "S3UploadFailedError":  # boto3's wrapper of a failed upload, as text
        message = str(exc)
        refused = any(f"({code})" in message for code in _REFUSED_S3_CODES)
        what = "refused this process's credentials" if refused else "failed an upload"
        return (REFUSED if refused else UNAVAILABLE), f"{_s3_endpoint()} {what} ({message})"
    message = str(exc)
    proxied = _PROXY_URL.search(message)
    if proxied and _SERVER_ERROR.search(message):
        server, path = proxied.group(1), proxied.group("path")
        if path is None:
            listed = _LISTED_PATH.search(message)
            path = unquote(listed.group(1)) if listed else "an artifact"
        return UNAVAILABLE, (
            f"the tracking server {server} could not move {path} to or from its artifact store (it "
            "answered with server errors or dropped the transfer). It proxies artifacts "
            "(--artifacts-destination): the object store behind it is down or refuses the server's "
            "credentials, and the tracking server's log names that store's error"
        )
    return None


def describe_store_error(exc: BaseException) -> tuple[str, str] | None:
    """(code, description) when `exc` (or what it wraps) is an artifact store failure, else None."""
    for current in _chain(exc):
        found = _describe_one(current)
        if found is not None:
            return found
    return None


@contextmanager
def store_errors_named(action: str) -> Iterator[None]:
    """Run the block; an artifact store failure inside it becomes ArtifactStoreError("{action}: ...")."""
    try:
        yield
    except ArtifactStoreError:
        raise
    except Exception as exc:
        found = describe_store_error(exc)
        if found is None:
            raise
        code, description = found
        raise ArtifactStoreError(f"{action}: {description}.", code=code) from exc
