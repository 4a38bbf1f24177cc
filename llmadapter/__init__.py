"""llmadapter: Transformers pipelines as OpenAI-compatible llm/v1 MLflow models, answered by our engine."""

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS
from llmadapter.config import EmbeddingsConfig, ModelConfig
from llmadapter.errors import (
    ArtifactStoreError,
    AuthenticationError,
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    LLMAdapterError,
    ModelSourceError,
    NotFoundError,
    OverloadedError,
    ValidationFailedError,
)
from llmadapter.mlflow_model import build_engine, default_pip_requirements, load_engine, log_model, save_model

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "ArtifactStoreError",
    "AuthenticationError",
    "ConfigError",
    "ContextLengthError",
    "EmbeddingsConfig",
    "InvalidRequestError",
    "LLMAdapterError",
    "ModelConfig",
    "ModelSourceError",
    "NotFoundError",
    "OverloadedError",
    "ValidationFailedError",
    "build_engine",
    "default_pip_requirements",
    "load_engine",
    "log_model",
    "save_model",
]
