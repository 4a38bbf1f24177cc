"""ServerSettings: the HTTP server's knobs, read from LLMADAPTER_* environment variables or given directly."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmadapter.config import DTYPE_HELP, QUANTIZATION_HELP, DtypeName, QuantizationName, WeightFormat

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _default_threads() -> int:
    # The cores this process may run on (a container's cpuset), not the host's count.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ServerSettings(BaseSettings):
    """How `llmadapter serve` listens, guards and sizes itself; every field has bounds.

    Precedence: values passed to the constructor (the CLI's flags) > LLMADAPTER_<FIELD> > defaults.
    The API key itself is never a setting: only the *name* of the variable that holds it is, so it
    never lands in a settings dump, a log line or a process listing.
    """

    model_config = SettingsConfigDict(env_prefix="LLMADAPTER_", extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1, description="Interface to listen on.")
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_key_env: str = Field(
        default="LLMADAPTER_API_KEY",
        description="Name of the environment variable holding the bearer key for /v1/* and /invocations; "
        "when that variable is unset or empty, those routes are open.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest request body accepted; larger bodies get a 413 OpenAI error.",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=24 * 3600,
        description="Wall-clock limit per request (queueing + generation); past it the generation is "
        "cancelled and the client gets a 504 (or an error event mid-stream).",
    )
    max_queue: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Most generation/embedding requests in flight across all models (queued or running); "
        "more get a 429 with Retry-After. Each engine also bounds its own queue.",
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        le=24 * 3600,
        description="On SIGTERM or SIGINT, how long requests in flight (streams included) may take to "
        "finish while new ones are refused; what is still running then is cancelled (503, or an error "
        "event mid-stream) and the server exits 0. A second signal exits at once. Keep it under the "
        "supervisor's own limit (Kubernetes' terminationGracePeriodSeconds, 30 s by default).",
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=3600, description="Retry-After seconds sent with 429 and 503 answers."
    )
    torch_threads: int = Field(
        default_factory=_default_threads,
        ge=1,
        le=1024,
        description="torch.set_num_threads for the serving process; one process owns the cores and "
        "batches requests instead of threads competing for them. Default: the number of cores.",
    )
    log_level: str = Field(
        default="info",
        pattern="^(critical|error|warning|info|debug|trace)$",
        description="uvicorn and llmadapter log level.",
    )
    request_metrics: bool = Field(
        default=True,
        description="Per-request latency histograms and finish-reason counts on /metrics (vLLM's names), "
        "recorded off the request path; false records none of them.",
    )
    tracing: bool = Field(
        default=False,
        description="Write sampled requests as MLflow traces (one span each, linked to the served "
        "LoggedModel) to the tracking store, from a background exporter.",
    )
    tracing_include_text: bool = Field(
        default=True,
        description="Record prompts and completions in traces; false keeps only parameters, usage, "
        "finish reasons and timings.",
    )
    tracing_sample_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Fraction of requests traced when tracing is on."
    )
    tracing_experiment: str = Field(
        default="",
        description="MLflow experiment (name) that receives the traces; empty: each served model's own "
        "experiment (its LoggedModel's).",
    )
    tracing_queue_size: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Traces waiting for the exporter at most; past it traces are dropped (counted in "
        "llmadapter_traces_dropped_total), never waited for.",
    )

    alias_poll_s: float = Field(
        default=30.0,
        ge=0,
        le=24 * 3600,
        description="How often a server of models:/NAME@ALIAS re-resolves the alias and swaps to the "
        "version it points at (a webhook also triggers it at once); 0 turns following off. A URI naming "
        "a version (models:/NAME/3) never changes.",
    )
    swap_strategy: Literal["overlap", "drain"] = Field(
        default="overlap",
        description="overlap: load the new version beside the serving one, then switch (two copies in "
        "memory for a while); drain: stop admitting, let running requests finish, free the old "
        "version, load the new one, resume (requests wait meanwhile, they are not refused).",
    )
    swap_retry_s: float = Field(
        default=300.0,
        ge=1,
        le=7 * 24 * 3600,
        description="After a version failed to load, warm or answer, how long before it is tried again "
        "(at once when the alias moves to another version).",
    )
    webhook_secret_env: str = Field(
        default="LLMADAPTER_WEBHOOK_SECRET",
        description="Name of the environment variable holding the MLflow webhook secret; POST "
        "/webhooks/mlflow verifies each delivery's HMAC signature with it. Unset or empty: the route "
        "answers 404.",
    )

    dtype: DtypeName = Field(
        default="auto", description=DTYPE_HELP + " Overrides the model_config's dtype; auto: keep it."
    )
    quantization: QuantizationName = Field(
        default="auto",
        description=QUANTIZATION_HELP + " Overrides the model_config's quantization; auto: keep it.",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where models run: auto (cuda when available, else cpu), cpu, cuda, cuda:N. The model, "
        "its KV cache and sampling live there.",
    )

    @field_validator("api_key_env", "webhook_secret_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError(f"'{value}' is not an environment variable name")
        return value

    def weight_format(self) -> WeightFormat:
        """The weight format these settings ask for (auto fields defer to the model_config)."""
        return WeightFormat(dtype=self.dtype, quantization=self.quantization, device=self.device)

    def api_key(self) -> str | None:
        """The bearer key from the environment, or None when the server runs without one."""
        return os.environ.get(self.api_key_env) or None

    def webhook_secret(self) -> str | None:
        """The MLflow webhook secret from the environment, or None (webhooks off)."""
        return os.environ.get(self.webhook_secret_env) or None
