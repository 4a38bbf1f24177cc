"""Models for the validation tests: real tiny models logged by llmadapter, and a scripted pyfunc double.

The double is a pyfunc loader module shaped like llmadapter's own: `get_raw_model()` returns an
engine-like object carrying the model_config (`config.stop`), which is where validation reads a model's
facts. Its answers have one known defect (`flaw`), and every generation uses all of max_tokens.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

import llmadapter
from llmadapter.catalog import CHAT
from llmadapter.config import ModelConfig


def log_source(source: Path | str, task: str, **kwargs: Any) -> str:
    with mlflow.start_run():
        return str(llmadapter.log_model(str(source), name="model", task=task, **kwargs).model_uri)


@dataclass(frozen=True)
class ScriptedEngine:
    """What validation asks of an engine: its model_config (no context window: unknown)."""

    config: ModelConfig


class ScriptedPyfunc:
    def __init__(self, flaw: str, config: ModelConfig) -> None:
        self.flaw = flaw
        self.engine = ScriptedEngine(config)

    def get_raw_model(self) -> ScriptedEngine:
        return self.engine

    def predict(self, model_input: Any, params: Any = None) -> dict[str, Any]:
        if self.flaw == "exit":
            # A worker that dies mid-session: validation must say so, quoting what it wrote.
            print("scripted model: exiting with code 3", file=sys.stderr, flush=True)
            os._exit(3)
        if "input" in model_input:
            embedding: list[float] | str = "!!not base64!!" if self.flaw == "bad-base64" else [0.6, 0.8]
            return {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                "model": "scripted",
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        n, max_tokens = model_input.get("n") or 1, model_input.get("max_tokens") or 16
        prompt_tokens: int | str = "3" if self.flaw == "string-tokens" else 3
        answer: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "scripted",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "word " * max_tokens},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n * max_tokens,
                "total_tokens": 3 + n * max_tokens,
            },
        }
        if self.flaw == "no-id":
            del answer["id"]
        return answer


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ScriptedPyfunc:
    """MLflow's loader hook: the flaw is the model's data file."""
    return ScriptedPyfunc(Path(data_path).read_text().strip(), ModelConfig.model_validate(model_config or {}))


def log_scripted(flaw: str, task: str = CHAT, model_config: dict[str, Any] | None = None) -> str:
    """Log the scripted double (found by module name, here and in a fresh process alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "flaw.txt"
        data.write_text(flaw)
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=__name__,
                data_path=str(data),
                metadata={"task": task},
                model_config=model_config,
            )
    return str(info.model_uri)
