"""Prefect tasks over llmadapter.source: resolve a model source to a local snapshot and its revision."""

from __future__ import annotations

from llmadapter.source import ResolvedSource, latest_revision, resolve_source
from tasks._retry import transient_task

# No Prefect cache here on purpose: the Hugging Face cache already makes a repeated download free,
# and a cached *path* could outlive the files it names. Caching starts at the log step, keyed on the
# revision this task resolves.


@transient_task(
    name="download", retries=3, retry_delay_seconds=[2, 10, 30], task_run_name="download {source}"
)
def download_model(source: str, revision: str | None = None) -> ResolvedSource:
    """Resolve `source` (hub id[@revision], local folder, .gguf file) to a local folder + pinned revision."""
    return resolve_source(source, revision=revision)


@transient_task(
    name="latest-revision",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    task_run_name="latest revision of {source}",
)
def check_latest_revision(source: str, revision: str | None = None) -> str | None:
    """The revision `source` points at upstream now (None when it cannot be known offline)."""
    return latest_revision(source, revision=revision)
