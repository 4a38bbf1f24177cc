"""Typed flow parameters and results shared by the flows (pydantic, so the Prefect UI renders forms)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmadapter.catalog import LLMTask, get_task
from llmadapter.config import TaskConfig
from llmadapter.errors import ModelSourceError
from llmadapter.evaluation import QualityOptions as QualityOptions  # the flows' `quality` parameter
from llmadapter.source import parse_source
from tasks.validate import ValidationOptions


def default_model_name(source: str, task: str) -> str:
    """A registry name from source and task: 'org/SmolLM2-135M-Instruct' -> 'smollm2-135m-instruct-chat'.

    A source that does not parse gets 'model-<task suffix>': the name then only labels the failure that
    the download step reports for it.
    """
    try:
        return parse_source(source).default_model_name(task)
    except ModelSourceError:
        return f"model-{get_task(task).name_suffix}"


class ModelSpec(BaseModel):
    """One model the refresh flow keeps registered (the log-and-validate parameters for it)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Hub id (org/name[@revision]), local folder or .gguf file.")
    task: LLMTask = "llm/v1/chat"
    model_name: str | None = Field(default=None, description="Registered model name (default from source).")
    revision: str | None = Field(default=None, description="Branch or tag to follow (default: main).")
    # Either config model: the flows validate it for `task` (TaskSpec.parse_config).
    config: TaskConfig | None = Field(default=None, description="model_config: request defaults.")
    save_pretrained: bool = True
    validation: ValidationOptions = Field(default_factory=ValidationOptions)

    def registered_name(self) -> str:
        return self.model_name or default_model_name(self.source, self.task)


class LogAndValidateResult(BaseModel):
    """What a log-and-validate run left in the registry."""

    model_name: str
    version: int
    model_uri: str
    created: bool = Field(description="False when an identical version existed and was reused.")
    revision: str
    task: str
    config_hash: str
    aliases: list[str]
    validation: str = Field(description="The validation summary line.")
    quality: str | None = Field(default=None, description="The quality gate's summary line, when asked.")


class ApprovalDecision(BaseModel):
    """What the promote flow decided and did."""

    model_name: str
    version: int
    alias: str
    outcome: Literal["approved", "rejected", "unchanged"]
    previous: int | None = None
    approver: str | None = None
    comment: str | None = None
    serving: list[str] = Field(default_factory=list, description="Each serving URL's confirmation.")
    quality: str | None = Field(default=None, description="The quality gate's summary line, when asked.")
    quality_overridden: bool = False
